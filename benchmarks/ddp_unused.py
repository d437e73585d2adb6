"""What DDP's ``find_unused_parameters=True`` costs K-Net, and whether any parameter goes unused.

Two processes (gloo, CPU, one thread each, as two 1-CPU Ray Train workers) train the quickstart model
on its synthetic data, once wrapped with ``find_unused_parameters=True`` and once with ``False``, in
interleaved rounds. Prints the warm step time of each and their ratio, and the parameters that got no
gradient on any step (with ``False``, DDP fails loudly if there is one).

    python -m benchmarks.ddp_unused [--steps 12] [--rounds 2] [--task panoptic|semantic]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from knet_platform.experiment.schema import load_experiment
from knet_platform.knet_adapter import build_model, collate_batch, to_device
from knet_platform.train.datasets import build_datasets, prepare_data
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

EXPERIMENTS = Path(__file__).absolute().parents[1] / "experiments"
YAML = {"panoptic": "quickstart.yaml", "semantic": "quickstart_semantic.yaml"}


def _worker(rank: int, args: argparse.Namespace, port: int, cache: str, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    experiment = load_experiment(
        EXPERIMENTS / YAML[args.task], ["data.num_workers=0", f"data.synthetic.cache_dir={cache}"]
    )
    datasets = build_datasets(experiment)
    config = experiment.model_config(datasets.categories)
    batches = list(DataLoader(datasets.train, batch_size=2, collate_fn=collate_batch))[rank::2][: args.steps]
    timings: dict[str, list[float]] = {"True": [], "False": []}
    unused: set[str] = set()
    for _ in range(args.rounds):
        for find_unused in (True, False):
            torch.manual_seed(0)
            model = DistributedDataParallel(build_model(config), find_unused_parameters=find_unused)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            never = {name for name, _ in model.module.named_parameters()}
            for step, batch in enumerate(batches):
                started = time.perf_counter()
                losses = model(
                    batch.images, [to_device(t, "cpu") for t in batch.targets], image_sizes=batch.image_sizes
                )
                optimizer.zero_grad(set_to_none=True)
                sum(losses.values()).backward()
                optimizer.step()
                if step >= 2:  # warm steps only
                    timings[str(find_unused)].append(time.perf_counter() - started)
                never -= {n for n, p in model.module.named_parameters() if p.grad is not None}
            unused |= never
    if rank == 0:
        results.update(timings=timings, unused=sorted(unused))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--task", choices=sorted(YAML), default="panoptic")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        prepare_data(load_experiment(EXPERIMENTS / YAML[args.task], [f"data.synthetic.cache_dir={cache}"]))
        results = mp.Manager().dict()
        mp.spawn(_worker, args=(args, 29500 + os.getpid() % 1000, cache, results), nprocs=2)
    timings = results["timings"]
    with_search, without = statistics.median(timings["True"]), statistics.median(timings["False"])
    print(f"task {args.task}: {len(timings['True'])} warm steps per setting on rank 0 (2 gloo workers)")
    print(f"  find_unused_parameters=True   {with_search * 1000:8.1f} ms/step")
    print(f"  find_unused_parameters=False  {without * 1000:8.1f} ms/step")
    print(f"  ratio True/False              {with_search / without:8.3f}")
    print(f"  parameters without a gradient on every step: {results['unused'] or 'none'}")


if __name__ == "__main__":
    main()

"""What the platform costs: the same small K-Net, the same steps, bare PyTorch vs ``run_experiment``.

Prints three figures:
1. warm step throughput through Ray Train (1 worker) / bare loop (same model, data, batch, 1 thread,
   as a 1-CPU Ray worker gets);
2. the fixed cost in seconds of a run through the platform (Ray start, worker group start, MLflow
   run, the final evaluation, bundle + model registration) beyond the bare loop's wall time;
3. images/s with 2 workers / 1 worker (DDP on CPU; on a 2-core machine the ceiling is 2x).

Run by hand (about 3 minutes on 2 cores):
    python benchmarks/platform_overhead.py [--steps-per-epoch 6] [--epochs 3]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import torch
from knet_platform.experiment.schema import Experiment, load_experiment
from knet_platform.knet_adapter import build_model
from knet_platform.train.datasets import build_datasets, prepare_data
from knet_platform.train.optim import build_optimizer
from torch.utils.data import DataLoader

from benchmarks.small_run import QUICKSTART, small_overrides
from knet.data import collate_batch


def small_experiment(workdir: Path, *, epochs: int, steps: int, workers: int) -> Experiment:
    return load_experiment(
        str(QUICKSTART), small_overrides(workdir, epochs=epochs, steps=steps, workers=workers)
    )


def bare_loop(experiment: Experiment, total_steps: int, warmup_steps: int) -> tuple[float, float]:
    """(warm steps/s, wall seconds) of a plain loop doing what one worker does, without Ray or MLflow."""
    torch.set_num_threads(1)
    started = time.perf_counter()
    datasets = build_datasets(experiment)
    model = build_model(experiment.model_config(datasets.categories))
    train = experiment.train
    optimizer = build_optimizer(
        model,
        lr=train.lr,
        backbone_lr_mult=train.backbone_lr_mult,
        weight_decay=train.weight_decay,
        betas=tuple(train.betas),
    )
    loader = DataLoader(datasets.train, batch_size=train.batch_size, shuffle=True, collate_fn=collate_batch)
    model.train()
    warm_started = None
    for step, batch in enumerate(itertools.islice(itertools.cycle(loader), total_steps)):
        if step == warmup_steps:
            warm_started = time.perf_counter()
        loss = sum(model(batch.images, batch.targets, image_sizes=batch.image_sizes).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip or float("inf"))
        optimizer.step()
    warm_rate = (total_steps - warmup_steps) / (time.perf_counter() - warm_started)
    return warm_rate, time.perf_counter() - started


def through_runner(experiment: Experiment) -> tuple[float, float]:
    """(warm steps/s per worker, from the epochs after the first; wall seconds) of ``run_experiment``."""
    from knet_platform.train.driver import run_experiment
    from mlflow.tracking import MlflowClient

    started = time.perf_counter()
    summary = run_experiment(experiment)
    wall = time.perf_counter() - started
    client = MlflowClient(tracking_uri=experiment.tracking.uri)
    history = sorted(client.get_metric_history(summary.run_id, "train/steps_per_s"), key=lambda m: m.step)
    warm = [m.value for m in history if m.step > 1] or [history[-1].value]
    return sum(warm) / len(warm), wall


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps-per-epoch", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    total_steps = args.steps_per_epoch * args.epochs

    with tempfile.TemporaryDirectory(prefix="knet-overhead-") as scratch:
        workdir = Path(scratch)
        one = small_experiment(workdir / "one", epochs=args.epochs, steps=args.steps_per_epoch, workers=1)
        two = small_experiment(workdir / "two", epochs=args.epochs, steps=args.steps_per_epoch, workers=2)
        prepare_data(one)
        bare_rate, bare_wall = bare_loop(one, total_steps, warmup_steps=args.steps_per_epoch)
        one_rate, one_wall = through_runner(one)
        two_rate, _ = through_runner(two)

    batch = one.train.batch_size
    print(f"\nsame model and data, {total_steps} steps of batch {batch} per worker")
    print(f"bare PyTorch loop          {bare_rate:6.2f} steps/s warm   {bare_wall:6.1f} s wall")
    print(f"run_experiment, 1 worker   {one_rate:6.2f} steps/s warm   {one_wall:6.1f} s wall")
    print(f"warm throughput ratio (platform / bare)        {one_rate / bare_rate:.2f}")
    print(f"fixed platform cost (wall difference)          {one_wall - bare_wall:.1f} s")
    print(
        f"2 workers vs 1 worker, images/s                {2 * two_rate * batch:.1f} vs {one_rate * batch:.1f} "
        f"= {2 * two_rate / one_rate:.2f}x"
    )


if __name__ == "__main__":
    main()

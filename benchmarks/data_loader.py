"""Loader throughput on synthetic data: images/s with 0 and 2 DataLoader workers, per format, next to
the training step rate (images/s of forward + backward) of the models it would feed.

    python -m benchmarks.data_loader [--images 64] [--size 256] [--batch 4] [--formats coco_panoptic parquet]

Generates (or re-uses) a synthetic dataset in a temporary folder, packs the panoptic train split to
Parquet for the ``parquet`` row, then times one full pass of ``DataLoader(build_dataset(...),
collate_fn=collate_batch)`` with train transforms (multi-scale resize, flip, crop) after a warm-up
batch. Worker start-up is included in the timed pass (that is what an epoch pays).
Model rates: the quickstart model (ResNet-18, 64 channels) and the paper's R-50 panoptic model, trained
on batches from the same loader at the same size (median of 3 steps after a warm-up, 2 threads). The data
path keeps up when the loader's rate (0 workers: it runs in the training process) is well above both.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from knet import KNetConfig, build_model
from knet.data import DataSource, TransformConfig, build_dataset, collate_batch, pack_dataset, synthesize


def images_per_second(source: DataSource, transforms: TransformConfig, batch: int, workers: int) -> float:
    dataset = build_dataset(source, transforms, train=True)
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=collate_batch)
    start, seen = time.perf_counter(), 0
    for item in loader:
        seen += len(item)
    return seen / (time.perf_counter() - start)


def model_images_per_second(cfg: KNetConfig, batch: tuple, threads: int, steps: int = 3) -> float:
    """Median forward + backward rate of a freshly built ``cfg`` model on one collated batch."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    images, targets, sizes = batch
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        losses = model(images, targets, image_sizes=sizes)
        sum(losses.values()).backward()
        model.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return len(images) / statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--formats", nargs="+", default=["coco_instance", "coco_panoptic", "semantic", "parquet"]
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    transforms = TransformConfig(
        train_short_sides=[args.size * 3 // 4, args.size],
        max_size=args.size * 2,
        crop_size=(args.size, args.size),
    )
    with tempfile.TemporaryDirectory() as tmp:
        data = synthesize(Path(tmp) / "synthetic", args.images, seed=0, image_size=(args.size, args.size))
        print(f"{data.num_train} train images of {args.size}x{args.size}, batch {args.batch}")
        rates: dict[tuple[str, int], float] = {}
        for fmt in args.formats:
            if fmt == "parquet":
                pack_dataset(data.source("coco_panoptic", "train"), str(Path(tmp) / "parquet"), shard_size=32)
                source = DataSource("parquet", shards=str(Path(tmp) / "parquet"))
            else:
                source = data.source(fmt, "train")
            for workers in (0, 2):
                rate = images_per_second(source, transforms, args.batch, workers)
                rates[(fmt, workers)] = rate
                print(f"{fmt:14s} workers={workers}: {rate:7.1f} images/s")

        dataset = build_dataset(data.source("coco_panoptic", "train"), transforms, train=True)
        loaded = collate_batch([dataset[i] for i in range(args.batch)])
        batch = (loaded.images, loaded.targets, loaded.image_sizes)
        things, stuff = dataset.categories.num_thing_classes, dataset.categories.num_stuff_classes
        quickstart = KNetConfig.for_task(
            "panoptic",
            num_thing_classes=things,
            num_stuff_classes=stuff,
            backbone={"name": "resnet18", "frozen_stages": -1, "norm_eval": False},
            channels=64,
            num_proposals=16,
            num_stages=2,
            update={"feedforward_channels": 256, "num_heads": 4},
        )
        r50 = KNetConfig.for_task("panoptic", num_thing_classes=things, num_stuff_classes=stuff)
        loader = rates.get(("coco_panoptic", 0)) or max(rates.values())
        print(f"training step rate at {args.size}x{args.size}, batch {args.batch}, 2 threads:")
        for name, cfg in (("quickstart model (R-18, 64 ch)", quickstart), ("R-50 panoptic (paper)", r50)):
            model_rate = model_images_per_second(cfg, batch, threads=2)
            print(
                f"  {name:32s} {model_rate:7.1f} images/s; loader (coco_panoptic, 0 workers) is "
                f"{loader / model_rate:5.1f}x faster"
            )


if __name__ == "__main__":
    main()

"""Loader throughput on synthetic data: images/s with 0 and 2 DataLoader workers, per format.

    python -m benchmarks.data_loader [--images 64] [--size 256] [--batch 4] [--formats coco_panoptic parquet]

Generates (or re-uses) a synthetic dataset in a temporary folder, packs the panoptic train split to
Parquet for the ``parquet`` row, then times one full pass of ``DataLoader(build_dataset(...),
collate_fn=collate_batch)`` with train transforms (multi-scale resize, flip, crop) after a warm-up
batch. Worker start-up is included in the timed pass (that is what an epoch pays).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from knet.data import DataSource, TransformConfig, build_dataset, collate_batch, pack_dataset, synthesize


def images_per_second(source: DataSource, transforms: TransformConfig, batch: int, workers: int) -> float:
    dataset = build_dataset(source, transforms, train=True)
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=collate_batch)
    start, seen = time.perf_counter(), 0
    for item in loader:
        seen += len(item)
    return seen / (time.perf_counter() - start)


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
        for fmt in args.formats:
            if fmt == "parquet":
                pack_dataset(data.source("coco_panoptic", "train"), str(Path(tmp) / "parquet"), shard_size=32)
                source = DataSource("parquet", shards=str(Path(tmp) / "parquet"))
            else:
                source = data.source(fmt, "train")
            for workers in (0, 2):
                rate = images_per_second(source, transforms, args.batch, workers)
                print(f"{fmt:14s} workers={workers}: {rate:7.1f} images/s")


if __name__ == "__main__":
    main()

"""build_dataset + DataLoader(collate_fn=collate_batch) give Batches in the interface format."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from knet.data import Batch, SyntheticDataset, TransformConfig, build_dataset, collate_batch

CFG = TransformConfig(
    train_short_sides=[48, 64], max_size=96, crop_size=(48, 48), test_short_side=64, test_max_size=96
)


def test_loader_yields_batches_matching_the_interface(synthetic: SyntheticDataset) -> None:
    ds = build_dataset(synthetic.source("coco_panoptic", "train"), CFG, train=True)
    assert ds.categories.num_thing_classes == 3
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate_batch)))
    assert isinstance(batch, Batch) and batch.images.dtype == torch.float32
    assert batch.images.shape[:2] == (3, 3)
    for target, (h, w), meta in zip(batch.targets, batch.image_sizes, batch.metas):
        assert target["masks"].shape[1:] == (h, w) and target["masks"].dtype == torch.bool
        assert target["labels"].dtype == torch.int64 and len(target["labels"]) == len(target["masks"])
        assert meta["orig_size"] == (64, 80) and meta["image_id"] == target["image_id"]


def test_train_items_are_reproducible_and_change_with_the_epoch(synthetic: SyntheticDataset) -> None:
    ds = build_dataset(synthetic.source("coco_instance", "train"), CFG, train=True, seed=1)
    first = [ds[i][0] for i in range(4)]
    assert all(torch.equal(a, ds[i][0]) for i, a in enumerate(first))
    ds.set_epoch(1)
    assert any(a.shape != ds[i][0].shape or not torch.equal(a, ds[i][0]) for i, a in enumerate(first))


def test_eval_items_are_resized_with_the_original_size_in_meta(synthetic: SyntheticDataset) -> None:
    ds = build_dataset(synthetic.source("semantic", "val"), CFG, train=False)
    image, target, meta = ds[0]
    assert image.shape == (3, 64, 80) and meta["orig_size"] == (64, 80)
    assert target["masks"].shape[1:] == (64, 80)

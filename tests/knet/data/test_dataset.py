"""build_dataset + DataLoader(collate_fn=collate_batch) give Batches in the interface format."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from knet.data import Batch, DataError, SyntheticDataset, TransformConfig, build_dataset, collate_batch
from knet.data.readers import open_reader
from knet.data.transforms import normalize

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


def test_eval_items_resize_the_image_and_keep_the_target_at_the_original_size(
    synthetic: SyntheticDataset,
) -> None:
    half = TransformConfig(test_short_side=32, test_max_size=96)  # 64x80 -> 32x40, exactly half
    ds = build_dataset(synthetic.source("semantic", "val"), half, train=False)
    image, target, meta = ds[0]
    assert image.shape == (3, 32, 40) and meta["orig_size"] == (64, 80) and meta["img_size"] == (32, 40)
    original_image, original_target, _ = open_reader(synthetic.source("semantic", "val")).read(0)
    # Halving: bilinear (align_corners=False) averages each 2x2 block.
    block_means = F.avg_pool2d(original_image[None].float(), 2)[0].round().to(torch.uint8)
    assert torch.allclose(image, normalize(block_means, half.mean, half.std), atol=1e-5)
    assert torch.equal(target["masks"], original_target["masks"])  # evaluation scores at the original size
    assert torch.equal(target["labels"], original_target["labels"])


def test_a_semantic_val_split_uses_the_train_category_table(synthetic: SyntheticDataset, tmp_path) -> None:
    # No categories JSON: each split alone would number the label values it happens to hold. Val here
    # lacks class 0 (label value 1), so alone it would shift every class id down by one.
    train_src = dataclasses.replace(synthetic.source("semantic", "train"), annotations=None)
    val_src = dataclasses.replace(synthetic.source("semantic", "val"), annotations=None, masks=str(tmp_path))
    for png in Path(synthetic.source("semantic", "val").masks).glob("*.png"):
        labels = np.asarray(Image.open(png)).copy()
        labels[labels == 1] = 2
        Image.fromarray(labels).save(tmp_path / png.name)
    train = build_dataset(train_src, CFG, train=True)
    assert [c.id for c in train.categories.categories] == [0, 1, 2, 3, 4]
    alone = build_dataset(val_src, CFG, train=False)
    assert [c.id for c in alone.categories.categories] == [1, 2, 3, 4]  # the hazard
    val = build_dataset(val_src, CFG, train=False, categories=train.categories)
    assert val.categories == train.categories
    _, target, _ = val[0]
    _, target_alone, _ = alone[0]
    assert target["labels"].tolist() == [k + 1 for k in target_alone["labels"].tolist()]


def test_a_val_split_listing_other_categories_is_named(synthetic: SyntheticDataset, tmp_path) -> None:
    train = build_dataset(synthetic.source("coco_panoptic", "train"), CFG, train=True)
    src = synthetic.source("coco_panoptic", "val")
    data = json.loads(Path(src.annotations).read_text())
    data["categories"].append({"id": 13, "name": "rock", "isthing": 0})  # a class train does not have
    (tmp_path / "val.json").write_text(json.dumps(data))
    other = dataclasses.replace(src, annotations=str(tmp_path / "val.json"))
    with pytest.raises(
        DataError,
        match=r"val\.json lists other categories than .*only here \[13\], only in the model's table \[\]",
    ):
        build_dataset(other, CFG, train=False, categories=train.categories)
    assert build_dataset(src, CFG, train=False, categories=train.categories).categories == train.categories

"""Every reader returns exactly what the synthetic generator holds in memory."""

from __future__ import annotations

import pytest
import torch

from knet.data import SyntheticDataset
from knet.data.readers import open_reader


@pytest.mark.parametrize("split", ["train", "val"])
def test_panoptic_reader_round_trips_the_generator(synthetic: SyntheticDataset, split: str) -> None:
    reader = open_reader(synthetic.source("coco_panoptic", split))
    assert (reader.categories.num_thing_classes, reader.categories.num_stuff_classes) == (3, 2)
    assert len(reader) == (8 if split == "train" else 2)
    for position in range(len(reader)):
        scene = synthetic.scene(split, position)
        image, target, meta = reader.read(position)
        expected = scene.target(reader.categories)
        assert torch.equal(image, scene.image)
        assert torch.equal(target["labels"], expected["labels"])
        assert torch.equal(target["masks"], expected["masks"])
        assert torch.equal(target["iscrowd"], expected["iscrowd"])
        assert meta["image_id"] == target["image_id"] == synthetic.image_ids(split)[position]
        assert meta["orig_size"] == (64, 80)


def test_instance_reader_round_trips_polygons_and_rle(synthetic: SyntheticDataset) -> None:
    reader = open_reader(synthetic.source("coco_instance", "train"))
    assert reader.categories.names == ["circle", "square", "triangle"]
    for position in range(len(reader)):
        scene = synthetic.scene("train", position)
        _, target, _ = reader.read(position)
        expected = scene.target(reader.categories, things_only=True)
        assert torch.equal(target["labels"], expected["labels"])
        assert torch.equal(target["masks"], expected["masks"])
        assert torch.equal(target["iscrowd"], expected["iscrowd"])


def test_semantic_reader_round_trips_with_reduce_zero_label(synthetic: SyntheticDataset) -> None:
    reader = open_reader(synthetic.source("semantic", "train"))
    assert reader.categories.num_thing_classes == 0
    assert reader.categories.num_stuff_classes == 5
    for position in range(len(reader)):
        label_map = synthetic.scene("train", position).label_map()  # (H, W) class index
        _, target, _ = reader.read(position)
        classes = sorted(set(label_map.unique().tolist()) - {255})
        assert target["labels"].tolist() == classes
        for label, mask in zip(target["labels"], target["masks"]):
            assert torch.equal(mask, label_map == label)


def test_semantic_zero_labels_become_ignore_and_get_no_mask(synthetic: SyntheticDataset, tmp_path) -> None:
    import dataclasses
    import shutil

    import numpy as np
    from PIL import Image

    src = synthetic.source("semantic", "val")
    masks = tmp_path / "labels"
    shutil.copytree(src.masks, masks)
    label = masks / "000009.png"
    array = np.asarray(Image.open(label)).copy()
    array[:5, :7] = 0  # unlabelled in the file -> 255 after reduce_zero_label
    Image.fromarray(array, mode="L").save(label)
    reader = open_reader(dataclasses.replace(src, masks=str(masks)))
    _, target, _ = reader.read(0)
    assert not bool(target["masks"][:, :5, :7].any())
    expected = synthetic.scene("val", 0).label_map()
    for lab, mask in zip(target["labels"], target["masks"]):
        brute = expected == lab
        brute[:5, :7] = False
        assert torch.equal(mask, brute)

"""skip_invalid at read time: an item that fails to decode is skipped with a counted warning naming the
file (training: the next readable item takes its place; evaluation: a placeholder the evaluators leave
out); without skip_invalid it is one DataError naming the file."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from knet.data import DataError, DataSource, SyntheticDataset, TransformConfig, build_dataset, pack_dataset
from knet.data.parquet import load_manifest
from knet.evaluation import PanopticEvaluator
from knet.structures import PanopticPrediction, Prediction

CFG = TransformConfig(
    train_short_sides=[64], max_size=96, flip_prob=0.0, test_short_side=64, test_max_size=96
)


@pytest.fixture
def copy(synthetic: SyntheticDataset, tmp_path: Path) -> SyntheticDataset:
    shutil.copytree(synthetic.out_dir, tmp_path / "data")
    return SyntheticDataset(
        tmp_path / "data", synthetic.seed, synthetic.image_size, synthetic.num_train, synthetic.num_val
    )


def _edit_json(path: str, edit: Callable[[dict], object]) -> None:
    data = json.loads(Path(path).read_text())
    edit(data)
    Path(path).write_text(json.dumps(data))


def _corrupt_image(src: DataSource) -> None:
    (Path(src.images) / "000001.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")


def _png_disagrees_with_json(src: DataSource) -> None:
    _edit_json(src.annotations, lambda d: d["annotations"][0]["segments_info"][0].update(id=7))


def _bad_segmentation(src: DataSource) -> None:
    _edit_json(src.annotations, lambda d: d["annotations"][0].update(segmentation={"counts": 5}))


def _label_outside_categories(src: DataSource) -> None:
    label = Path(src.masks) / "000001.png"
    array = np.asarray(Image.open(label)).copy()
    array[0, 0] = 9  # class 8 after reduce_zero_label: not among the 5 categories
    Image.fromarray(array, mode="L").save(label)


# Each breaks the first train image (000001.png, image id 1) in a way only decoding finds.
BREAKAGES = {
    "corrupt image": ("coco_instance", _corrupt_image, r"cannot decode image .*000001\.png"),
    "panoptic PNG vs JSON": (
        "coco_panoptic",
        _png_disagrees_with_json,
        r"panoptic PNG .*000001\.png does not match",
    ),
    "bad segmentation": (
        "coco_instance",
        _bad_segmentation,
        r"bad segmentation in .*train\.json \(image 000001\.png\)",
    ),
    "label outside categories": ("semantic", _label_outside_categories, r"category id 8 in .*000001\.png"),
}


def _with_skip(src: DataSource) -> DataSource:
    return DataSource.from_dict({**src.to_dict(), "skip_invalid": True})


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_without_skip_invalid_an_undecodable_item_is_one_error_naming_the_file(
    copy: SyntheticDataset, breakage: str
) -> None:
    fmt, damage, message = BREAKAGES[breakage]
    src = copy.source(fmt, "train")
    damage(src)
    ds = build_dataset(src, CFG, train=True)
    with pytest.raises(DataError, match=message):
        ds[0]


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_training_skips_an_undecodable_item_for_the_next_and_warns_with_a_count(
    copy: SyntheticDataset, breakage: str, caplog
) -> None:
    fmt, damage, message = BREAKAGES[breakage]
    src = copy.source(fmt, "train")
    damage(src)
    ds = build_dataset(_with_skip(src), CFG, train=True)
    with caplog.at_level(logging.WARNING):
        image, target, meta = ds[0]
    assert meta["file_name"] == "000002.png"  # the next item stands in
    assert torch.equal(image, ds[1][0])
    assert list(ds.skipped) == [0]
    assert len(caplog.records) == 1
    assert "skipped unreadable item 0 of 8" in caplog.text and "1 item(s) skipped so far" in caplog.text
    assert re.search(message, caplog.text)  # the warning names the file and what is wrong
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert ds[0][2]["file_name"] == "000002.png"  # known bad: skipped again without re-warning
    assert caplog.text == ""


def test_evaluation_leaves_an_undecodable_item_out_of_the_metrics(copy: SyntheticDataset, caplog) -> None:
    src = copy.source("coco_panoptic", "val")
    (Path(src.images) / "000009.png").write_bytes(b"garbage")
    ds = build_dataset(_with_skip(src), CFG, train=False)
    with caplog.at_level(logging.WARNING):
        image, target, meta = ds[0]
    assert "cannot decode image" in target["skipped"] and "000009.png" in target["skipped"]
    assert meta["skipped"] == target["skipped"] and meta["image_id"] is None
    assert image.shape[0] == 3 and target["labels"].numel() == 0
    assert "1 item(s) skipped so far" in caplog.text
    # The readable item alone and together with the placeholder give the same PQ: it is not scored.
    _, readable_target, _ = ds[1]
    alone, with_placeholder = (PanopticEvaluator(3, 2) for _ in range(2))
    alone.process([_perfect(readable_target)], [readable_target])
    placeholder_prediction = _perfect(readable_target, size=tuple(target["masks"].shape[-2:]))
    with_placeholder.process([placeholder_prediction, _perfect(readable_target)], [target, readable_target])
    assert with_placeholder.evaluate() == alone.evaluate()
    assert alone.evaluate()["pq"] == pytest.approx(100.0)


def _perfect(target: dict, size: tuple[int, int] | None = None) -> Prediction:
    """The target itself as a panoptic prediction (or an all-VOID one of ``size``)."""
    masks = target["masks"]
    if size is not None:
        ids, labels = torch.zeros(size, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)
    else:
        ids = (masks.long() * torch.arange(1, len(masks) + 1)[:, None, None]).sum(0)
        labels = target["labels"]
    scores = torch.ones(len(labels))
    return Prediction(tuple(ids.shape), panoptic=PanopticPrediction(ids, labels, scores, labels < 3))


def test_when_no_item_can_be_read_training_stops_with_an_error(copy: SyntheticDataset) -> None:
    src = copy.source("coco_instance", "val")
    for png in Path(src.images).glob("*.png"):
        png.write_bytes(b"garbage")
    ds = build_dataset(_with_skip(src), CFG, train=True)
    with pytest.raises(
        DataError, match=r"none of the 2 items can be read; first problem: cannot decode image"
    ):
        ds[0]


def test_packing_with_skip_invalid_leaves_out_an_undecodable_image(
    copy: SyntheticDataset, tmp_path: Path, caplog
) -> None:
    src = copy.source("coco_panoptic", "train")
    _corrupt_image(src)
    with pytest.raises(DataError, match=r"cannot decode image .*000001\.png"):
        pack_dataset(src, str(tmp_path / "strict"))
    with caplog.at_level(logging.WARNING):
        manifest = pack_dataset(_with_skip(src), str(tmp_path / "shards"))
    assert manifest.num_images == 7 and load_manifest(str(tmp_path / "shards")).num_images == 7
    assert "left out 1 unreadable one(s)" in caplog.text

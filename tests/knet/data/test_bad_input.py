"""Each kind of bad input fails with a DataError naming the file (or is skipped with a warning)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from knet.data import DataError, DataSource, SyntheticDataset, build_dataset, check_dataset
from knet.data.readers import open_reader


@pytest.fixture
def copy(synthetic: SyntheticDataset, tmp_path: Path) -> SyntheticDataset:
    """A private copy of the synthetic dataset that a test may break."""
    shutil.copytree(synthetic.out_dir, tmp_path / "data")
    return SyntheticDataset(
        tmp_path / "data", synthetic.seed, synthetic.image_size, synthetic.num_train, synthetic.num_val
    )


def _edit_json(path: str, edit) -> None:
    data = json.loads(Path(path).read_text())
    edit(data)
    Path(path).write_text(json.dumps(data))


@pytest.mark.parametrize("fmt", ["coco_instance", "coco_panoptic", "semantic"])
def test_missing_image_file_is_named_at_construction(copy: SyntheticDataset, fmt: str) -> None:
    src = copy.source(fmt, "train")
    (Path(src.images) / "000002.png").unlink()
    if fmt == "semantic":  # paired by stem: the label 000002.png has lost its image
        with pytest.raises(DataError, match=r"label map .*semantic/train/000002\.png has no image"):
            open_reader(src)
        return
    with pytest.raises(DataError, match=r"image file not found.*000002\.png"):
        open_reader(src)


def test_semantic_image_without_label_map_is_named(copy: SyntheticDataset) -> None:
    src = copy.source("semantic", "train")
    (Path(src.masks) / "000003.png").unlink()
    with pytest.raises(DataError, match=r"label map not found.*000003\.png"):
        open_reader(src)


def test_panoptic_image_without_annotation_entry_is_named(copy: SyntheticDataset) -> None:
    src = copy.source("coco_panoptic", "train")
    _edit_json(src.annotations, lambda d: d["annotations"].pop(2))  # image 000003.png, id 3
    with pytest.raises(
        DataError, match=r"image 000003\.png \(id 3\) in .*train\.json has no entry in annotations"
    ):
        open_reader(src)


def test_panoptic_annotation_of_an_unlisted_image_is_named(copy: SyntheticDataset) -> None:
    src = copy.source("coco_panoptic", "train")
    _edit_json(src.annotations, lambda d: d["annotations"][0].update(image_id=77))
    with pytest.raises(
        DataError, match=r"annotation 000001\.png in .*train\.json has image_id 77, which is not"
    ):
        open_reader(src)


def test_panoptic_image_with_two_annotation_entries_is_named(copy: SyntheticDataset) -> None:
    src = copy.source("coco_panoptic", "train")
    _edit_json(src.annotations, lambda d: d["annotations"].append(d["annotations"][1]))
    with pytest.raises(DataError, match=r"image 2 has two annotation entries in .*train\.json"):
        open_reader(src)


def test_instance_annotation_of_an_unlisted_image_is_named(copy: SyntheticDataset) -> None:
    src = copy.source("coco_instance", "train")
    _edit_json(src.annotations, lambda d: d["annotations"][0].update(image_id=77, id=5001))
    with pytest.raises(DataError, match=r"annotation 5001 in .*train\.json has image_id 77, which is not"):
        open_reader(src)


def test_instance_images_without_annotations_are_kept_as_negatives(copy: SyntheticDataset) -> None:
    src = copy.source("coco_instance", "train")
    _edit_json(
        src.annotations, lambda d: d.update(annotations=[a for a in d["annotations"] if a["image_id"] != 1])
    )
    reader = open_reader(src)
    assert len(reader) == 8
    image, target, meta = reader.read(0)
    assert meta["image_id"] == 1 and target["labels"].numel() == 0
    assert target["masks"].shape == (0, *image.shape[-2:])


def test_skip_invalid_counts_orphans_as_well(copy: SyntheticDataset, caplog) -> None:
    src = copy.source("coco_panoptic", "train")

    def break_two(data: dict) -> None:
        data["annotations"].pop(2)  # image 3 without an entry
        data["annotations"][0]["image_id"] = 77  # an entry without an image; image 1 without an entry

    _edit_json(src.annotations, break_two)
    with caplog.at_level(logging.WARNING):
        reader = open_reader(DataSource.from_dict({**src.to_dict(), "skip_invalid": True}))
    assert [r.image_id for r in reader.records] == [2, 4, 5, 6, 7, 8]
    assert "skipped 3 invalid image(s) or annotation(s)" in caplog.text


def test_skip_invalid_drops_the_image_and_warns_with_a_count(copy: SyntheticDataset, caplog) -> None:
    src = copy.source("coco_panoptic", "train")
    (Path(src.images) / "000002.png").unlink()
    (Path(src.images) / "000004.png").unlink()
    with caplog.at_level(logging.WARNING):
        reader = open_reader(DataSource.from_dict({**src.to_dict(), "skip_invalid": True}))
    assert len(reader) == 6
    assert "skipped 2 invalid image(s) or annotation(s)" in caplog.text and "000002.png" in caplog.text


def test_corrupt_image_is_named_when_read(copy: SyntheticDataset) -> None:
    src = copy.source("coco_instance", "train")
    (Path(src.images) / "000001.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    reader = open_reader(src)
    with pytest.raises(DataError, match=r"cannot decode image .*000001\.png"):
        reader.read(0)


def test_json_that_is_not_coco_is_named(copy: SyntheticDataset) -> None:
    src = copy.source("coco_instance", "train")
    Path(src.annotations).write_text(json.dumps({"info": {}, "licenses": []}))
    with pytest.raises(DataError, match=r"train\.json is not a COCO instances JSON.*images"):
        open_reader(src)
    Path(src.annotations).write_text("{ not json")
    with pytest.raises(DataError, match=r"train\.json is not valid JSON"):
        open_reader(src)


def test_unknown_category_id_is_named(copy: SyntheticDataset) -> None:
    src = copy.source("coco_instance", "train")
    _edit_json(src.annotations, lambda d: d["annotations"][0].update(category_id=99))
    with pytest.raises(DataError, match=r"category id 99 in .*train\.json"):
        open_reader(src)
    psrc = copy.source("coco_panoptic", "train")
    _edit_json(psrc.annotations, lambda d: d["annotations"][1]["segments_info"][0].update(category_id=42))
    with pytest.raises(DataError, match=r"category id 42 in .*coco_panoptic/train\.json"):
        open_reader(psrc)


def test_semantic_label_outside_the_categories_is_named(copy: SyntheticDataset) -> None:
    src = copy.source("semantic", "train")
    label = Path(src.masks) / "000001.png"
    array = np.asarray(Image.open(label)).copy()
    array[0, 0] = 9  # class 8 after reduce_zero_label: not among the 5 categories
    Image.fromarray(array, mode="L").save(label)
    reader = open_reader(src)
    with pytest.raises(DataError, match=r"category id 8 in .*semantic/train/000001\.png"):
        reader.read(0)


def test_panoptic_png_not_matching_its_json_is_named(copy: SyntheticDataset) -> None:
    src = copy.source("coco_panoptic", "train")
    _edit_json(src.annotations, lambda d: d["annotations"][0]["segments_info"][0].update(id=7))
    reader = open_reader(src)
    with pytest.raises(DataError, match=r"panoptic PNG .*coco_panoptic/train/000001\.png does not match"):
        reader.read(0)


def test_empty_dataset_is_an_error_naming_the_file(copy: SyntheticDataset) -> None:
    src = copy.source("coco_panoptic", "val")
    _edit_json(src.annotations, lambda d: d.update(images=[], annotations=[]))
    with pytest.raises(DataError, match=r"coco_panoptic/val\.json: the dataset is empty"):
        build_dataset(src, transforms=None, train=False)


def test_check_dataset_lists_every_problem_and_is_not_ok(copy: SyntheticDataset) -> None:
    src = copy.source("coco_panoptic", "train")
    (Path(src.images) / "000002.png").unlink()
    (Path(src.images) / "000003.png").write_bytes(b"garbage")
    report = check_dataset(src)
    assert not report.ok
    assert report.num_images == 6
    assert len(report.problems) == 2
    assert "NOT OK" in report.summary() and "000003.png" in report.summary()

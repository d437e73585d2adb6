"""A dataset JSON with a field of the wrong JSON type is one DataError naming the file, the entry and
the field (never a KeyError, a TypeError or ``error: 0``), and ``check_dataset`` reports it."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from knet.data import DataError, SyntheticDataset, check_dataset
from knet.data.categories import CategoryTable
from knet.data.check import detect_source
from knet.data.readers import open_reader


@pytest.fixture
def copy(synthetic: SyntheticDataset, tmp_path: Path) -> SyntheticDataset:
    shutil.copytree(synthetic.out_dir, tmp_path / "data")
    return SyntheticDataset(
        tmp_path / "data", synthetic.seed, synthetic.image_size, synthetic.num_train, synthetic.num_val
    )


def _edit_json(path: str, edit: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(Path(path).read_text())
    edit(data)
    Path(path).write_text(json.dumps(data))


def _set(*keys: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit setting ``data[k0][k1]...[kn] = value``."""

    def edit(data: dict[str, Any]) -> None:
        for key in keys[:-1]:
            data = data[key]
        data[keys[-1]] = value

    return edit


def _del(*keys: Any) -> Callable[[dict[str, Any]], None]:
    def edit(data: dict[str, Any]) -> None:
        for key in keys[:-1]:
            data = data[key]
        del data[keys[-1]]

    return edit


CASES = [
    ("coco_panoptic", _set("annotations", 1, "segments_info", value=None),
     r"train\.json: annotations\[1\] \(image_id \d+\) field 'segments_info' must be a list, found null"),
    ("coco_panoptic", _set("annotations", 0, "file_name", value=7),
     r"train\.json: annotations\[0\] \(image_id \d+\) field 'file_name' must be a string, found an integer 7"),
    ("coco_panoptic", _set("annotations", 2, "segments_info", 0, "category_id", value=[1]),
     r"annotations\[2\] \(image_id \d+\) segments_info\[0\] field 'category_id' must be an integer"),
    ("coco_panoptic", _set("images", value={"id": 1}),
     r"train\.json: 'images' must be a list, found an object"),
    ("coco_instance", _set("images", value={"id": 1}),
     r"train\.json: 'images' must be a list, found an object"),
    ("coco_instance", _set("images", 3, "id", value="4"),
     r"train\.json: images\[3\] field 'id' must be an integer, found a string \"4\""),
    ("coco_instance", _del("images", 0, "file_name"),
     r"train\.json: images\[0\] \(id \d+\) lacks the field 'file_name'"),
    ("coco_instance", _set("annotations", 2, "image_id", value=[1]),
     r"train\.json: annotations\[2\] \(id \d+\) field 'image_id' must be an integer, found a list"),
    ("coco_instance", _set("annotations", 1, "segmentation", value=5),
     r"train\.json: annotations\[1\] \(id \d+\) field 'segmentation' must be a polygon list or an RLE"),
    ("coco_instance", _set("annotations", value=None),
     r"train\.json: 'annotations' must be a list, found null"),
    ("coco_instance", _del("categories", 1, "id"),
     r"train\.json: categories\[1\] lacks the field 'id'"),
    ("coco_panoptic", _set("categories", 0, "isthing", value="yes"),
     r"train\.json: categories\[0\] \(id \d+\) field 'isthing' must be 0 or 1"),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "edit", "message"), CASES)
def test_reader_names_the_file_entry_and_field_of_a_wrong_json_type(
    copy: SyntheticDataset, fmt: str, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    src = copy.source(fmt, "train")
    _edit_json(src.annotations, edit)
    with pytest.raises(DataError, match=message) as caught:
        open_reader(src)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("fmt", "edit", "message"), CASES[:5])
def test_check_dataset_reports_a_wrong_json_type_as_a_named_problem(
    copy: SyntheticDataset, fmt: str, edit: Callable[[dict[str, Any]], None], message: str
) -> None:
    src = copy.source(fmt, "train")
    _edit_json(src.annotations, edit)
    try:
        report = check_dataset(src.annotations)
    except DataError as error:  # found while detecting the format: the CLI's one error line
        assert "train.json" in str(error)
        return
    assert not report.ok
    assert any("train.json" in problem for problem in report.problems), report.problems


def test_format_detection_names_images_given_as_an_object(copy: SyntheticDataset) -> None:
    src = copy.source("coco_instance", "train")
    _edit_json(src.annotations, _set("images", value={"0": {"id": 1}}))
    with pytest.raises(DataError, match=r"train\.json: 'images' must be a list, found an object"):
        detect_source(src.annotations)


def test_semantic_categories_json_without_an_id_is_named(copy: SyntheticDataset) -> None:
    src = copy.source("semantic", "train")
    _edit_json(src.annotations, _del("categories", 0, "id"))
    with pytest.raises(DataError, match=r"categories\.json: categories\[0\] lacks the field 'id'"):
        open_reader(src)


def test_category_table_from_a_non_list_names_the_file() -> None:
    with pytest.raises(DataError, match=r"x\.json: 'categories' must be a list, found dict"):
        CategoryTable.from_coco({"id": 1}, file="x.json")

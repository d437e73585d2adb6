"""The real ``knet`` CLI on bad dataset and result files: exit code 2 and exactly one ``error:`` line
naming the file, never a traceback."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from knet_platform.cli import main

from knet.data import SyntheticDataset, synthesize


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    return synthesize(tmp_path_factory.mktemp("synthetic"), num_images=4, seed=0, image_size=(48, 64))


@pytest.fixture
def copy(synthetic: SyntheticDataset, tmp_path: Path) -> Path:
    shutil.copytree(synthetic.out_dir, tmp_path / "data")
    return tmp_path / "data"


def _one_error_line(capsys: pytest.CaptureFixture[str], exit_code: int, file_name: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert file_name in lines[0] and "Traceback" not in err
    return lines[0]


def _instance_results(data: Path) -> list[dict[str, Any]]:
    gt = json.loads((data / "coco_instance" / "val.json").read_text())
    return [
        {k: a[k] for k in ("image_id", "category_id", "segmentation")} | {"score": 0.9}
        for a in gt["annotations"]
    ]


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("score", math.nan, "result 0: score must be a finite number"),
        ("segmentation", {"size": [48, 64], "counts": "!!!garbage"}, "result 0 (image_id"),
        ("image_id", [1], "result 0: image_id must be an integer"),
    ],
)
def test_evaluate_results_with_a_bad_entry_is_one_error_naming_file_and_entry(
    copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], field: str, value: Any, says: str
) -> None:
    results = _instance_results(copy)
    results[0][field] = value
    (tmp_path / "results.json").write_text(json.dumps(results))
    gt = str(copy / "coco_instance" / "val.json")
    exit_code = main(["evaluate-results", "instance", "--gt", gt, "--pred", str(tmp_path / "results.json")])
    assert says in _one_error_line(capsys, exit_code, "results.json")


def test_evaluate_results_with_null_segments_info_is_one_error(
    copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gt_json = copy / "coco_panoptic" / "val.json"
    data = json.loads(gt_json.read_text())
    data["annotations"][0]["segments_info"] = None
    (tmp_path / "pred.json").write_text(json.dumps(data))
    shutil.copytree(gt_json.with_suffix(""), tmp_path / "pred")
    exit_code = main(
        ["evaluate-results", "panoptic", "--gt", str(gt_json), "--pred", str(tmp_path / "pred.json")]
    )
    assert "segments_info must be a list" in _one_error_line(capsys, exit_code, "pred.json")


def test_data_pack_of_a_dataset_with_null_segments_info_is_one_error(
    copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train_json = copy / "coco_panoptic" / "train.json"
    data = json.loads(train_json.read_text())
    data["annotations"][1]["segments_info"] = None
    train_json.write_text(json.dumps(data))
    exit_code = main(["data", "pack", str(train_json), str(tmp_path / "packed")])
    line = _one_error_line(capsys, exit_code, "train.json")
    assert "annotations[1]" in line and "'segments_info' must be a list" in line


def test_data_check_of_images_given_as_an_object_is_one_error(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    train_json = copy / "coco_instance" / "train.json"
    data = json.loads(train_json.read_text())
    data["images"] = {str(image["id"]): image for image in data["images"]}
    train_json.write_text(json.dumps(data))
    exit_code = main(["data", "check", str(train_json)])
    assert "'images' must be a list" in _one_error_line(capsys, exit_code, "train.json")

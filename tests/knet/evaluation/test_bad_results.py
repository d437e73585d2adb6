"""evaluate_results checks every result entry before scoring: a malformed one is one KnetInputError
naming the file and the entry, never a traceback or a silently wrong metric."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest

from knet.data import synthesize
from knet.errors import KnetInputError
from knet.evaluation import evaluate_results


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory):
    return synthesize(tmp_path_factory.mktemp("synthetic"), num_images=4, seed=0, image_size=(48, 64))


@pytest.fixture
def instance_results(synthetic, tmp_path: Path) -> tuple[Path, Path, list[dict[str, Any]]]:
    """(GT JSON, results path, results that are the GT annotations with a score each)."""
    gt_json = synthetic.out_dir / "coco_instance" / "val.json"
    gt = json.loads(gt_json.read_text())
    results = [
        {k: a[k] for k in ("image_id", "category_id", "segmentation")} | {"score": 0.9}
        for a in gt["annotations"]
    ]
    return gt_json, tmp_path / "results.json", results


@pytest.fixture
def panoptic_copy(synthetic, tmp_path: Path) -> tuple[Path, Path, dict[str, Any]]:
    gt_json = synthetic.out_dir / "coco_panoptic" / "val.json"
    shutil.copytree(gt_json.with_suffix(""), tmp_path / "pred")
    return gt_json, tmp_path / "pred.json", json.loads(gt_json.read_text())


def test_instance_results_copying_the_ground_truth_score_100(instance_results) -> None:
    gt_json, pred_json, results = instance_results
    pred_json.write_text(json.dumps(results))
    assert evaluate_results("instance", gt_json, pred_json)["mask_ap"] == pytest.approx(100.0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("score", math.nan, r"result 1: score must be a finite number, found NaN"),
        ("score", "0.9", r'result 1: score must be a finite number, found "0.9"'),
        ("score", None, r"result 1: score must be a finite number, found null"),
        ("image_id", [4], r"result 1: image_id must be an integer, found \[4\]"),
        ("category_id", [1], r"result 1: category_id must be an integer, found \[1\]"),
        ("segmentation", 7, r"result 1 \(image_id \d+\): segmentation must be an RLE"),
    ],
)
def test_instance_result_with_a_field_of_the_wrong_type_is_named(
    instance_results, field: str, value: Any, message: str
) -> None:
    gt_json, pred_json, results = instance_results
    results[1][field] = value
    pred_json.write_text(json.dumps(results))
    with pytest.raises(KnetInputError, match=r"results\.json: " + message) as caught:
        evaluate_results("instance", gt_json, pred_json)
    assert "\n" not in str(caught.value)


def test_instance_rle_of_garbage_characters_is_refused_not_scored(instance_results) -> None:
    gt_json, pred_json, results = instance_results
    results[2]["segmentation"] = {"size": [48, 64], "counts": "!!!garbage"}
    pred_json.write_text(json.dumps(results))
    with pytest.raises(
        KnetInputError, match=r"results\.json: result 2 \(image_id \d+\): segmentation counts is not a COCO"
    ):
        evaluate_results("instance", gt_json, pred_json)


def test_instance_rle_of_another_size_than_its_image_is_named(instance_results) -> None:
    gt_json, pred_json, results = instance_results
    results[0]["segmentation"] = {"size": [96, 128], "counts": [96 * 128]}
    pred_json.write_text(json.dumps(results))
    with pytest.raises(
        KnetInputError,
        match=r"result 0 \(image_id \d+\): segmentation size \[96, 128\] differs from .*\[48, 64\]",
    ):
        evaluate_results("instance", gt_json, pred_json)


def test_instance_rle_whose_runs_do_not_cover_the_image_is_named(instance_results) -> None:
    gt_json, pred_json, results = instance_results
    results[0]["segmentation"] = {"size": [48, 64], "counts": [10, 20]}
    pred_json.write_text(json.dumps(results))
    with pytest.raises(KnetInputError, match=r"result 0 .*counts runs sum to 30, not height \* width = 3072"):
        evaluate_results("instance", gt_json, pred_json)


def test_instance_polygon_results_are_accepted(instance_results) -> None:
    gt_json, pred_json, results = instance_results
    results[0]["segmentation"] = [[1.0, 1.0, 20.0, 1.0, 20.0, 20.0]]
    pred_json.write_text(json.dumps(results))
    assert 0.0 <= evaluate_results("instance", gt_json, pred_json)["mask_ap"] <= 100.0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("segments_info", None, r"annotation 0 \(image_id \d+\): segments_info must be a list"),
        ("file_name", 7, r"annotation 0 \(image_id \d+\): file_name must be the PNG's name"),
        ("image_id", [4], r"annotation 0: image_id must be an integer, found \[4\]"),
    ],
)
def test_panoptic_annotation_with_a_field_of_the_wrong_type_is_named(
    panoptic_copy, field: str, value: Any, message: str
) -> None:
    gt_json, pred_json, data = panoptic_copy
    data["annotations"][0][field] = value
    pred_json.write_text(json.dumps(data))
    with pytest.raises(KnetInputError, match=r"pred\.json: " + message):
        evaluate_results("panoptic", gt_json, pred_json)


def test_panoptic_segment_with_a_list_id_is_named(panoptic_copy) -> None:
    gt_json, pred_json, data = panoptic_copy
    data["annotations"][0]["segments_info"][2]["category_id"] = [1]
    pred_json.write_text(json.dumps(data))
    with pytest.raises(
        KnetInputError, match=r"pred\.json: annotation 0 .*segment 2 category_id must be an integer"
    ):
        evaluate_results("panoptic", gt_json, pred_json)


def test_instance_uncompressed_rle_results_are_scored_like_compressed_ones(instance_results) -> None:
    gt_json, pred_json, results = instance_results
    results[0]["segmentation"] = {"size": [48, 64], "counts": [48 * 64]}  # an empty mask
    pred_json.write_text(json.dumps(results))
    assert 0.0 <= evaluate_results("instance", gt_json, pred_json)["mask_ap"] < 100.0

"""evaluate_results on bad result files: one ValueError (``error: ...`` from the CLI) naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from knet.data import synthesize
from knet.evaluation import evaluate_results


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory):
    return synthesize(tmp_path_factory.mktemp("synthetic"), num_images=4, seed=0, image_size=(48, 64))


@pytest.fixture
def panoptic_copy(synthetic, tmp_path: Path) -> tuple[Path, Path, dict]:
    """(GT JSON, a prediction JSON that is a copy of the GT with its PNG folder beside it, its data)."""
    gt_json = synthetic.out_dir / "coco_panoptic" / "val.json"
    shutil.copytree(gt_json.with_suffix(""), tmp_path / "pred")
    (tmp_path / "pred.json").write_text(gt_json.read_text())
    return gt_json, tmp_path / "pred.json", json.loads(gt_json.read_text())


def test_panoptic_json_that_is_not_coco_is_named(synthetic, panoptic_copy, tmp_path: Path) -> None:
    gt_json, pred_json, _ = panoptic_copy
    (tmp_path / "info.json").write_text(json.dumps({"info": {}, "licenses": []}))
    with pytest.raises(ValueError, match=r"info\.json is not a COCO panoptic ground-truth JSON.*categories"):
        evaluate_results("panoptic", tmp_path / "info.json", pred_json, gt_masks=gt_json.with_suffix(""))
    pred_json.write_text(json.dumps([{"image_id": 1}]))
    with pytest.raises(ValueError, match=r"pred\.json is not a COCO panoptic results JSON.*annotations"):
        evaluate_results("panoptic", gt_json, pred_json)
    pred_json.write_text("{ not json")
    with pytest.raises(ValueError, match=r"pred\.json is not valid JSON"):
        evaluate_results("panoptic", gt_json, pred_json)


def test_panoptic_prediction_png_of_another_size_names_both_files(panoptic_copy, tmp_path: Path) -> None:
    gt_json, pred_json, data = panoptic_copy
    png = tmp_path / "pred" / data["annotations"][0]["file_name"]
    Image.open(png).resize((128, 96), Image.NEAREST).save(png)  # twice the size, same segments
    with pytest.raises(
        ValueError, match=r"prediction .*pred/\S+\.png is \(96, 128\).*ground truth .*val/\S+\.png"
    ):
        evaluate_results("panoptic", gt_json, pred_json)


def test_panoptic_prediction_segment_missing_from_its_png_is_named(panoptic_copy) -> None:
    gt_json, pred_json, data = panoptic_copy
    data["annotations"][0]["segments_info"].append({"id": 4242, "category_id": 1, "iscrowd": 0})
    pred_json.write_text(json.dumps(data))
    with pytest.raises(
        ValueError, match=r"pred/\S+\.png: segment ids \[4242\] are in its segments_info in .*pred\.json"
    ):
        evaluate_results("panoptic", gt_json, pred_json)


def test_panoptic_prediction_of_an_unknown_category_is_named(panoptic_copy) -> None:
    gt_json, pred_json, data = panoptic_copy
    data["annotations"][0]["segments_info"][0]["category_id"] = 99
    pred_json.write_text(json.dumps(data))
    with pytest.raises(
        ValueError, match=r"pred\.json: category_id 99 is not among the categories of .*val\.json"
    ):
        evaluate_results("panoptic", gt_json, pred_json)


def test_instance_files_that_are_not_coco_are_named(synthetic, tmp_path: Path) -> None:
    gt_json = synthetic.out_dir / "coco_instance" / "val.json"
    (tmp_path / "info.json").write_text(json.dumps({"info": {}}))
    (tmp_path / "results.json").write_text("[]")
    with pytest.raises(ValueError, match=r"info\.json is not a COCO instances ground-truth JSON"):
        evaluate_results("instance", tmp_path / "info.json", tmp_path / "results.json")
    with pytest.raises(ValueError, match=r"info\.json is not a COCO results JSON: expected a list"):
        evaluate_results("instance", gt_json, tmp_path / "info.json")


def test_instance_result_for_an_image_not_in_the_ground_truth_is_named(synthetic, tmp_path: Path) -> None:
    gt_json = synthetic.out_dir / "coco_instance" / "val.json"
    rle = {"size": [48, 64], "counts": "0"}
    result = {"image_id": 999, "category_id": 1, "segmentation": rle, "score": 0.5}
    (tmp_path / "results.json").write_text(json.dumps([result]))
    with pytest.raises(ValueError, match=r"results\.json: result 0 has image_id 999.*images of .*val\.json"):
        evaluate_results("instance", gt_json, tmp_path / "results.json")


def test_semantic_prediction_of_another_size_names_both_files(synthetic, tmp_path: Path) -> None:
    gt_dir = synthetic.out_dir / "semantic" / "val"
    pred_dir = tmp_path / "pred"
    shutil.copytree(gt_dir, pred_dir)
    png = sorted(pred_dir.glob("*.png"))[0]
    Image.fromarray(np.asarray(Image.open(png))[:-1]).save(png)
    with pytest.raises(
        ValueError, match=rf"prediction .*pred/{png.name} is \(47, 64\).*ground truth .*val/{png.name}"
    ):
        evaluate_results("semantic", gt_dir, pred_dir, num_classes=5, reduce_zero_label=True)

"""evaluate_results reads the formats knet.data.synthesize writes: ground truth scored against itself
is perfect, and a damaged copy is not."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from knet.data import synthesize
from knet.evaluation import evaluate_results


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory):
    return synthesize(tmp_path_factory.mktemp("synthetic"), num_images=4, seed=0, image_size=(48, 64))


def test_panoptic_ground_truth_scored_against_itself_is_perfect(synthetic) -> None:
    gt_json = synthetic.out_dir / "coco_panoptic" / "val.json"
    metrics = evaluate_results("panoptic", gt_json, gt_json)
    assert metrics["pq"] == pytest.approx(100.0) and metrics["rq"] == pytest.approx(100.0)


def test_instance_ground_truth_as_results_gives_100_ap(synthetic, tmp_path: Path) -> None:
    gt_json = synthetic.out_dir / "coco_instance" / "val.json"
    coco = COCO(str(gt_json))
    results = []
    for ann in coco.dataset["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        rle = coco.annToRLE(ann)
        rle["counts"] = rle["counts"].decode() if isinstance(rle["counts"], bytes) else rle["counts"]
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "segmentation": rle,
                "score": 1.0,
            }
        )
    assert results
    (tmp_path / "results.json").write_text(json.dumps(results))
    metrics = evaluate_results("instance", gt_json, tmp_path / "results.json")
    assert metrics["mask_ap"] == pytest.approx(100.0)


def test_semantic_labels_scored_against_themselves_and_a_damaged_copy(synthetic, tmp_path: Path) -> None:
    gt_dir = synthetic.out_dir / "semantic" / "val"
    categories = json.loads((synthetic.out_dir / "semantic" / "categories.json").read_text())["categories"]
    perfect = evaluate_results(
        "semantic", gt_dir, gt_dir, num_classes=len(categories), reduce_zero_label=True
    )
    assert perfect["miou"] == pytest.approx(100.0) and perfect["aacc"] == pytest.approx(100.0)
    damaged_dir = tmp_path / "damaged"
    damaged_dir.mkdir()
    for png in gt_dir.glob("*.png"):
        labels = np.asarray(Image.open(png)).copy()
        labels[: labels.shape[0] // 2] = 1  # top half predicted as the first class
        Image.fromarray(labels).save(damaged_dir / png.name)
    damaged = evaluate_results(
        "semantic", gt_dir, damaged_dir, num_classes=len(categories), reduce_zero_label=True
    )
    assert damaged["miou"] < 100.0

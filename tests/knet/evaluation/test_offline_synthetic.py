"""evaluate_results reads the formats knet.data.synthesize writes: ground truth scored against itself
is perfect, and a prediction damaged in a known way scores what a count by hand says."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from knet.data import synthesize
from knet.evaluation import evaluate_results
from knet.evaluation.writers import ids_to_rgb, rgb_to_ids


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory):
    """8 images: 6 train + 2 val; the val split has 4 classes, one of them (square) with 3 segments."""
    return synthesize(tmp_path_factory.mktemp("synthetic"), num_images=8, seed=0, image_size=(48, 64))


def test_panoptic_ground_truth_scored_against_itself_is_perfect(synthetic) -> None:
    gt_json = synthetic.out_dir / "coco_panoptic" / "val.json"
    metrics = evaluate_results("panoptic", gt_json, gt_json)
    assert metrics["pq"] == pytest.approx(100.0) and metrics["rq"] == pytest.approx(100.0)


def test_panoptic_prediction_missing_one_segment_scores_the_fraction_counted_by_hand(
    synthetic, tmp_path: Path
) -> None:
    gt_json = synthetic.out_dir / "coco_panoptic" / "val.json"
    gt = json.loads(gt_json.read_text())
    segments = Counter(s["category_id"] for a in gt["annotations"] for s in a["segments_info"])
    assert not any(s["iscrowd"] for a in gt["annotations"] for s in a["segments_info"])
    dropped_class, n = segments.most_common(1)[0]
    assert n >= 2  # the fraction below is neither 0 nor 1
    # The prediction is the GT with one segment of that class turned into VOID (pixels and JSON entry).
    pred = json.loads(gt_json.read_text())
    pred_dir = tmp_path / "pred"
    shutil.copytree(gt_json.with_suffix(""), pred_dir)
    ann = next(
        a for a in pred["annotations"] if any(s["category_id"] == dropped_class for s in a["segments_info"])
    )
    segment = next(s for s in ann["segments_info"] if s["category_id"] == dropped_class)
    ann["segments_info"].remove(segment)
    ids = rgb_to_ids(np.asarray(Image.open(pred_dir / ann["file_name"]).convert("RGB")))
    ids[ids == segment["id"]] = 0
    Image.fromarray(ids_to_rgb(ids)).save(pred_dir / ann["file_name"])
    (tmp_path / "pred.json").write_text(json.dumps(pred))

    metrics = evaluate_results("panoptic", gt_json, tmp_path / "pred.json")

    # By hand: every other segment is matched with IoU 1; the dropped class has n - 1 TP and 1 FN, so its
    # PQ = RQ = (n - 1) / (n - 1 + 0.5) and SQ = 1; every other class has PQ 1; PQ averages over classes.
    classes = len(segments)
    dropped_pq = (n - 1) / (n - 1 + 0.5)
    assert metrics["pq"] == pytest.approx(100 * (classes - 1 + dropped_pq) / classes)
    assert metrics["rq"] == pytest.approx(metrics["pq"]) and metrics["sq"] == pytest.approx(100.0)
    names = {c["id"]: c["name"] for c in gt["categories"]}
    assert metrics["per_class"][names[dropped_class]]["pq"] == pytest.approx(100 * dropped_pq)
    things = {c["id"] for c in gt["categories"] if c["isthing"]}
    thing_classes = len(things & set(segments))
    expected_th = (thing_classes - 1 + dropped_pq) / thing_classes if dropped_class in things else 1.0
    assert metrics["pq_th"] == pytest.approx(100 * expected_th)


def _instance_results(gt_json: Path) -> list[dict]:
    """The GT's non-crowd annotations as COCO results (RLE, score 1)."""
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
    return results


def test_instance_ground_truth_as_results_gives_100_ap(synthetic, tmp_path: Path) -> None:
    gt_json = synthetic.out_dir / "coco_instance" / "val.json"
    results = _instance_results(gt_json)
    assert results
    (tmp_path / "results.json").write_text(json.dumps(results))
    metrics = evaluate_results("instance", gt_json, tmp_path / "results.json")
    assert metrics["mask_ap"] == pytest.approx(100.0)


def test_instance_results_missing_one_category_score_its_share_of_the_mean(synthetic, tmp_path: Path) -> None:
    gt_json = synthetic.out_dir / "coco_instance" / "val.json"
    results = _instance_results(gt_json)
    categories = sorted({r["category_id"] for r in results})
    assert len(categories) >= 2
    kept = [r for r in results if r["category_id"] != categories[0]]
    (tmp_path / "results.json").write_text(json.dumps(kept))
    metrics = evaluate_results("instance", gt_json, tmp_path / "results.json")
    # COCO AP averages over categories with (non-crowd) GT: the dropped one has AP 0, the others 1.
    assert metrics["mask_ap"] == pytest.approx(100 * (len(categories) - 1) / len(categories))


def test_semantic_labels_scored_against_themselves_and_a_damaged_copy(synthetic, tmp_path: Path) -> None:
    gt_dir = synthetic.out_dir / "semantic" / "val"
    categories = json.loads((synthetic.out_dir / "semantic" / "categories.json").read_text())["categories"]
    num_classes = len(categories)
    perfect = evaluate_results("semantic", gt_dir, gt_dir, num_classes=num_classes, reduce_zero_label=True)
    assert perfect["miou"] == pytest.approx(100.0) and perfect["aacc"] == pytest.approx(100.0)
    damaged_dir = tmp_path / "damaged"
    damaged_dir.mkdir()
    pairs = []  # (gt, prediction) label arrays as written
    for png in sorted(gt_dir.glob("*.png")):
        gt = np.asarray(Image.open(png))
        pred = gt.copy()
        pred[: pred.shape[0] // 2] = 1  # top half predicted as the first class
        Image.fromarray(pred).save(damaged_dir / png.name)
        pairs.append((gt, pred))
    damaged = evaluate_results(
        "semantic", gt_dir, damaged_dir, num_classes=num_classes, reduce_zero_label=True
    )
    # Brute force, class by class, in the file's ids: 0 is unlabelled, class k is k + 1.
    ious, correct, labelled = [], 0, 0
    for file_id in range(1, num_classes + 1):
        inter = union = 0
        for gt, pred in pairs:
            valid = gt != 0
            inter += int(((gt == file_id) & (pred == file_id) & valid).sum())
            union += int((((gt == file_id) | (pred == file_id)) & valid).sum())
        if union:
            ious.append(inter / union)
    for gt, pred in pairs:
        correct += int(((gt == pred) & (gt != 0)).sum())
        labelled += int((gt != 0).sum())
    assert damaged["miou"] == pytest.approx(100 * sum(ious) / len(ious))
    assert damaged["aacc"] == pytest.approx(100 * correct / labelled)
    assert damaged["miou"] < 100.0

"""Score result files in the official formats against ground-truth files (``knet evaluate-results``).

- panoptic: COCO panoptic GT JSON + PNG folder vs a results JSON + PNG folder (pq_compute's inputs);
- instance: COCO instances GT JSON vs a COCO results JSON (COCOeval ``segm``);
- semantic: a GT label PNG folder vs a prediction PNG folder, files paired by stem.

The same evaluator classes as in training do the counting, so numbers agree with in-memory evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from knet.evaluation.instance import coco_mask_metrics
from knet.evaluation.panoptic import PanopticEvaluator
from knet.evaluation.semantic import SemanticEvaluator
from knet.evaluation.writers import rgb_to_ids


def evaluate_results(
    task: Literal["panoptic", "instance", "semantic"],
    gt: str | Path,
    pred: str | Path,
    *,
    gt_masks: str | Path | None = None,
    pred_masks: str | Path | None = None,
    num_classes: int | None = None,
    reduce_zero_label: bool = False,
    ignore_index: int = 255,
) -> dict[str, float | dict]:
    """Metrics (percent) of result files.

    panoptic: ``gt``/``pred`` are JSON files, ``gt_masks``/``pred_masks`` their PNG folders (default:
    the JSON path without ``.json``, the COCO layout). instance: ``gt``/``pred`` are JSON files.
    semantic: ``gt``/``pred`` are PNG folders of class ids (contiguous ids, or contiguous + 1 with
    ``reduce_zero_label``, where GT 0 becomes ``ignore_index``); ``num_classes`` is required.
    """
    if task == "panoptic":
        return _evaluate_panoptic(Path(gt), Path(pred), gt_masks, pred_masks)
    if task == "instance":
        return coco_mask_metrics(json.loads(Path(gt).read_text()), json.loads(Path(pred).read_text()))
    if task == "semantic":
        if num_classes is None:
            raise ValueError("semantic evaluation needs num_classes (the number of contiguous class ids)")
        return _evaluate_semantic(Path(gt), Path(pred), num_classes, reduce_zero_label, ignore_index)
    raise ValueError(f"task={task!r}: expected 'panoptic', 'instance' or 'semantic'")


def _evaluate_panoptic(
    gt_json: Path, pred_json: Path, gt_masks: str | Path | None, pred_masks: str | Path | None
) -> dict[str, float | dict]:
    gt_data = json.loads(gt_json.read_text())
    pred_data = json.loads(pred_json.read_text())
    gt_dir = Path(gt_masks) if gt_masks is not None else gt_json.with_suffix("")
    pred_dir = Path(pred_masks) if pred_masks is not None else pred_json.with_suffix("")
    categories = sorted(gt_data["categories"], key=lambda c: (not c.get("isthing", 1), c["id"]))
    contiguous = {c["id"]: k for k, c in enumerate(categories)}  # things first, then stuff
    num_things = sum(1 for c in categories if c.get("isthing", 1))
    evaluator = PanopticEvaluator(
        num_things,
        len(categories) - num_things,
        class_names=[c.get("name", str(c["id"])) for c in categories],
    )
    predictions = {ann["image_id"]: ann for ann in pred_data["annotations"]}
    for gt_ann in gt_data["annotations"]:
        pred_ann = predictions.get(gt_ann["image_id"])
        if pred_ann is None:
            raise ValueError(f"no prediction for image_id {gt_ann['image_id']} in {pred_json}")
        gt_ids, gt_segments = _read_segments(gt_dir / gt_ann["file_name"], gt_ann["segments_info"])
        pred_ids, pred_segments = _read_segments(pred_dir / pred_ann["file_name"], pred_ann["segments_info"])
        try:
            gt_labels = torch.tensor([contiguous[s["category_id"]] for s in gt_segments], dtype=torch.int64)
            pred_labels = torch.tensor(
                [contiguous[s["category_id"]] for s in pred_segments], dtype=torch.int64
            )
        except KeyError as error:
            raise ValueError(f"category_id {error.args[0]} is not among the GT categories") from None
        iscrowd = torch.tensor([bool(s.get("iscrowd", 0)) for s in gt_segments], dtype=torch.bool)
        evaluator.process_id_maps(gt_ids, gt_labels, iscrowd, pred_ids, pred_labels)
    return evaluator.evaluate()


def _read_segments(png: Path, segments_info: list[dict]) -> tuple[torch.Tensor, list[dict]]:
    """RGB-id PNG -> ((H, W) int64 map with 0 = VOID and s + 1 = segments_info[s], segments_info)."""
    ids = rgb_to_ids(np.asarray(Image.open(png).convert("RGB")))
    values, inverse = np.unique(ids, return_inverse=True)
    index = {s["id"]: k + 1 for k, s in enumerate(segments_info)}
    unknown = [int(v) for v in values if v != 0 and v not in index]
    if unknown:
        raise ValueError(f"{png}: segment ids {unknown[:5]} are in the PNG but not in segments_info")
    lookup = np.array([index.get(int(v), 0) for v in values], dtype=np.int64)
    return torch.from_numpy(lookup[inverse.reshape(ids.shape)]), segments_info


def _evaluate_semantic(
    gt_dir: Path, pred_dir: Path, num_classes: int, reduce_zero_label: bool, ignore_index: int
) -> dict[str, float | dict]:
    evaluator = SemanticEvaluator(num_classes=num_classes, ignore_index=ignore_index)
    gt_files = sorted(gt_dir.glob("*.png"))
    if not gt_files:
        raise ValueError(f"no ground-truth PNGs in {gt_dir}")
    for gt_file in gt_files:
        pred_file = pred_dir / gt_file.name
        if not pred_file.exists():
            raise ValueError(f"no prediction {pred_file} for ground truth {gt_file}")
        gt = np.asarray(Image.open(gt_file), dtype=np.int64)
        pred = np.asarray(Image.open(pred_file), dtype=np.int64)
        if reduce_zero_label:
            gt = np.where(gt == 0, ignore_index, np.where(gt == ignore_index, ignore_index, gt - 1))
            pred = pred - 1
        if gt.shape != pred.shape:
            raise ValueError(f"{pred_file} is {pred.shape} but {gt_file} is {gt.shape}")
        evaluator.process_label_maps(torch.from_numpy(gt), torch.from_numpy(pred))
    return evaluator.evaluate()

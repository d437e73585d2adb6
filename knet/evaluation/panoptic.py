"""Panoptic quality (Kirillov et al. 2019) with the exact rules of the official ``pq_compute``.

Per image we build a GT id map and a predicted id map and count every (GT segment, predicted segment)
overlap with one ``bincount``; matching, VOID and crowd handling then work on that small matrix.
Rules (panopticapi): a prediction and a non-crowd GT of the same class match when IoU > 0.5, where the
union leaves out the prediction's VOID pixels; an unmatched prediction is not a false positive when more
than half of it lies on VOID plus the crowd region of its own class; unmatched non-crowd GT are false
negatives. "The crowd region of a class" is ONE segment, as in ``pq_compute_single_core``: when an image
has several crowd segments of a class, the last one (in ``segments_info`` order, here the GT row order)
counts and overlap with the others does not. Per-class sums (TP, FP, FN, matched IoU) are the whole state, so worker states merge by adding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from knet.evaluation._common import check_same_size, default_class_names, masks_to_id_map
from knet.structures import Prediction


@dataclass
class PanopticState:
    """Per-class counts over every image seen: (K,) arrays, K = things + stuff."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    iou_sum: np.ndarray

    @classmethod
    def zeros(cls, num_classes: int) -> PanopticState:
        ints = np.zeros(num_classes, dtype=np.int64)
        return cls(ints.copy(), ints.copy(), ints.copy(), np.zeros(num_classes, dtype=np.float64))

    def add(self, other: PanopticState) -> None:
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou_sum += other.iou_sum


def image_pq_stats(
    gt_ids: Tensor,
    gt_labels: Tensor,
    gt_iscrowd: Tensor,
    pred_ids: Tensor,
    pred_labels: Tensor,
    num_classes: int,
) -> PanopticState:
    """Per-class TP/FP/FN/IoU sums of one image.

    gt_ids: (H, W) int64, 0 = VOID, g in 1..G is GT segment g - 1; gt_labels, gt_iscrowd: (G,).
    pred_ids: (H, W) int64, 0 = VOID, p in 1..P is predicted segment p - 1; pred_labels: (P,).
    Predicted segments with no pixel are ignored (the official format cannot hold them).
    """
    num_gt, num_pred = int(gt_labels.numel()), int(pred_labels.numel())
    gt_labels, pred_labels = gt_labels.long(), pred_labels.long()
    gt_iscrowd = gt_iscrowd.bool()
    for name, labels in (("ground-truth", gt_labels), ("predicted", pred_labels)):
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(f"{name} labels must be in [0, {num_classes}), got {labels.tolist()}")
    for name, ids, count in (("ground-truth", gt_ids, num_gt), ("predicted", pred_ids, num_pred)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > count):
            raise ValueError(
                f"{name} id map holds ids in [{int(ids.min())}, {int(ids.max())}] but there are {count} "
                "segments; ids must be 0 (VOID) or 1..M indexing the labels"
            )
    joint = gt_ids.reshape(-1) * (num_pred + 1) + pred_ids.reshape(-1)  # (H*W,)
    overlap = torch.bincount(joint, minlength=(num_gt + 1) * (num_pred + 1))
    overlap = overlap.reshape(num_gt + 1, num_pred + 1).double()  # (G+1, P+1), row/col 0 = VOID
    gt_area = overlap.sum(1)[1:]  # (G,)
    pred_area = overlap.sum(0)[1:]  # (P,)
    inter = overlap[1:, 1:]  # (G, P)
    pred_on_void = overlap[0, 1:]  # (P,)

    union = pred_area[None, :] + gt_area[:, None] - inter - pred_on_void[None, :]  # (G, P)
    iou = inter / union.clamp(min=1.0)
    same_class = gt_labels[:, None] == pred_labels[None, :]  # (G, P)
    matches = same_class & ~gt_iscrowd[:, None] & (iou > 0.5)  # at most one per row and column
    gt_matched = matches.any(1)
    pred_matched = matches.any(0)

    # Unmatched predictions mostly on VOID or on the crowd region of their own class are not FP. The
    # official code keeps one crowd segment per class, the last one listed: crowd_labels_dict[c] = g.
    crowd_rows = torch.nonzero(gt_iscrowd).squeeze(1)  # (C,) GT rows that are crowd, in order
    last_crowd = torch.full((num_classes,), -1, dtype=torch.int64)
    last_crowd.scatter_reduce_(0, gt_labels[crowd_rows], crowd_rows, reduce="amax")  # (K,) -1 = none
    class_crowd = torch.zeros(num_gt, dtype=torch.bool)
    class_crowd[last_crowd[last_crowd >= 0]] = True  # (G,)
    crowd_same_class = same_class & class_crowd[:, None]  # (G, P)
    on_crowd = (inter * crowd_same_class).sum(0)  # (P,)
    ignored = (pred_on_void + on_crowd) / pred_area.clamp(min=1.0) > 0.5
    is_fp = ~pred_matched & ~ignored & (pred_area > 0)
    is_fn = ~gt_matched & ~gt_iscrowd

    stats = PanopticState.zeros(num_classes)
    matched_labels = gt_labels[gt_matched]
    stats.tp += torch.bincount(matched_labels, minlength=num_classes).numpy()
    stats.iou_sum += (
        torch.zeros(num_classes, dtype=torch.float64).index_add_(0, gt_labels, (iou * matches).sum(1)).numpy()
    )
    stats.fp += torch.bincount(pred_labels[is_fp], minlength=num_classes).numpy()
    stats.fn += torch.bincount(gt_labels[is_fn], minlength=num_classes).numpy()
    return stats


def pq_summary(state: PanopticState, class_ids: list[int]) -> tuple[float, float, float, int]:
    """(PQ, SQ, RQ, n) in percent averaged over the given classes that occur (TP + FP + FN > 0)."""
    pq = sq = rq = 0.0
    counted = 0
    for k in class_ids:
        tp, fp, fn = int(state.tp[k]), int(state.fp[k]), int(state.fn[k])
        if tp + fp + fn == 0:
            continue
        counted += 1
        denominator = tp + 0.5 * fp + 0.5 * fn
        pq += float(state.iou_sum[k]) / denominator
        sq += float(state.iou_sum[k]) / tp if tp else 0.0
        rq += tp / denominator
    if counted == 0:
        return 0.0, 0.0, 0.0, 0
    return 100 * pq / counted, 100 * sq / counted, 100 * rq / counted, counted


class PanopticEvaluator:
    """PQ / SQ / RQ overall, over things, over stuff and per class, accumulated image by image.

    Classes are contiguous ids: things ``[0, T)``, stuff ``[T, T + S)``. A class that never occurs in
    GT or predictions is left out of the averages (as panopticapi does); with no class at all the
    averages are 0.
    """

    def __init__(
        self, num_thing_classes: int, num_stuff_classes: int, class_names: list[str] | None = None
    ) -> None:
        if num_thing_classes < 0 or num_stuff_classes < 0 or num_thing_classes + num_stuff_classes == 0:
            raise ValueError(
                f"num_thing_classes={num_thing_classes}, num_stuff_classes={num_stuff_classes}: "
                "both must be >= 0 and at least one class is needed"
            )
        self.num_thing_classes = num_thing_classes
        self.num_stuff_classes = num_stuff_classes
        self.num_classes = num_thing_classes + num_stuff_classes
        self.class_names = default_class_names(class_names, self.num_classes)
        self._state = PanopticState.zeros(self.num_classes)

    def reset(self) -> None:
        self._state = PanopticState.zeros(self.num_classes)

    def process(self, predictions: list[Prediction], targets: list[dict]) -> None:
        """Add images: each prediction needs ``.panoptic``; targets have ``labels``, ``masks``,
        optional ``iscrowd`` (see docs/interfaces.md §1). A target with ``"skipped"`` (an unreadable
        image ``KNetDataset`` left out under ``skip_invalid``) is not scored."""
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
        for prediction, target in zip(predictions, targets):
            if target.get("skipped"):
                continue
            if prediction.panoptic is None:
                raise ValueError(
                    "prediction has no panoptic part; build the model with inference.panoptic_on=True"
                )
            gt_ids = masks_to_id_map(target["masks"])
            segment_map = prediction.panoptic.segment_map
            check_same_size("panoptic segment_map", tuple(segment_map.shape), tuple(gt_ids.shape))
            labels = target["labels"]
            iscrowd = target.get("iscrowd")
            if iscrowd is None:
                iscrowd = torch.zeros(labels.shape[0], dtype=torch.bool)
            self.process_id_maps(gt_ids, labels, iscrowd, segment_map.long(), prediction.panoptic.labels)

    def process_id_maps(
        self,
        gt_ids: Tensor,
        gt_labels: Tensor,
        gt_iscrowd: Tensor,
        pred_ids: Tensor,
        pred_labels: Tensor,
    ) -> None:
        """Add one image given as id maps (shapes in :func:`image_pq_stats`)."""
        self._state.add(
            image_pq_stats(
                gt_ids.cpu(),
                gt_labels.cpu(),
                gt_iscrowd.cpu(),
                pred_ids.cpu(),
                pred_labels.cpu(),
                self.num_classes,
            )
        )

    def state(self) -> PanopticState:
        return PanopticState(
            self._state.tp.copy(),
            self._state.fp.copy(),
            self._state.fn.copy(),
            self._state.iou_sum.copy(),
        )

    def merge(self, states: list[PanopticState]) -> None:
        """Add states from other evaluators (e.g. gathered from workers) to this one."""
        for state in states:
            if state.tp.shape != (self.num_classes,):
                raise ValueError(f"state has {state.tp.shape[0]} classes, this evaluator {self.num_classes}")
            self._state.add(state)

    def evaluate(self) -> dict[str, float | dict]:
        things = list(range(self.num_thing_classes))
        stuff = list(range(self.num_thing_classes, self.num_classes))
        metrics: dict[str, float | dict] = {}
        for suffix, class_ids in (("", things + stuff), ("_th", things), ("_st", stuff)):
            pq, sq, rq, _ = pq_summary(self._state, class_ids)
            metrics[f"pq{suffix}"], metrics[f"sq{suffix}"], metrics[f"rq{suffix}"] = pq, sq, rq
        per_class: dict[str, dict[str, float]] = {}
        for k, name in enumerate(self.class_names):
            pq, sq, rq, counted = pq_summary(self._state, [k])
            if counted:
                per_class[name] = {"pq": pq, "sq": sq, "rq": rq}
        metrics["per_class"] = per_class
        return metrics

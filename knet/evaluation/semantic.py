"""mIoU / mAcc / aAcc from a confusion matrix accumulated with ``torch.bincount``.

The ground-truth map of an image gives each pixel the label of the mask covering it and
``ignore_index`` where no mask does. Classes absent from both GT and predictions have a NaN IoU and are
left out of the means (mmseg's NaN-aware mean); a class only predicted has IoU 0 and a NaN accuracy.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from knet.evaluation._common import check_same_size, default_class_names, masks_to_id_map
from knet.structures import Prediction


def target_label_map(target: dict, ignore_index: int) -> Tensor:
    """(M, H, W) masks + (M,) labels -> (H, W) int64 label map, ``ignore_index`` where unlabelled."""
    ids = masks_to_id_map(target["masks"])  # (H, W), 0 = none, m + 1 = mask m
    lookup = torch.cat([torch.tensor([ignore_index]), target["labels"].long().cpu()])  # (M + 1,)
    return lookup[ids]


class SemanticEvaluator:
    """Confusion-matrix semantic segmentation metrics over contiguous class ids ``[0, num_classes)``."""

    def __init__(
        self, num_classes: int, ignore_index: int = 255, class_names: list[str] | None = None
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes}: need at least one class")
        if 0 <= ignore_index < num_classes:
            raise ValueError(
                f"ignore_index={ignore_index} is a real class id (num_classes={num_classes}); "
                "use an id outside [0, num_classes), e.g. 255"
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = default_class_names(class_names, num_classes)
        self._confusion = np.zeros((num_classes, num_classes), dtype=np.int64)

    def reset(self) -> None:
        self._confusion = np.zeros((self.num_classes, self.num_classes), dtype=np.int64)

    def process(self, predictions: list[Prediction], targets: list[dict]) -> None:
        """Add images: each prediction needs ``.semantic``; targets have ``labels`` and ``masks``. A
        target with ``"skipped"`` (an unreadable image ``KNetDataset`` left out under ``skip_invalid``)
        is not scored."""
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
        for prediction, target in zip(predictions, targets):
            if target.get("skipped"):
                continue
            if prediction.semantic is None:
                raise ValueError(
                    "prediction has no semantic part; build the model with inference.semantic_on=True"
                )
            gt = target_label_map(target, self.ignore_index)
            pred = prediction.semantic.label_map
            check_same_size("semantic label_map", tuple(pred.shape), tuple(gt.shape))
            self.process_label_maps(gt, pred)

    def process_label_maps(self, gt: Tensor, pred: Tensor) -> None:
        """Add one image: gt, pred (H, W) integer maps; gt pixels equal to ``ignore_index`` are skipped."""
        gt, pred = gt.reshape(-1).long().cpu(), pred.reshape(-1).long().cpu()
        valid = gt != self.ignore_index
        gt, pred = gt[valid], pred[valid]
        k = self.num_classes
        for name, values in (("ground-truth", gt), ("predicted", pred)):
            if values.numel() and (int(values.min()) < 0 or int(values.max()) >= k):
                raise ValueError(
                    f"{name} semantic labels must be in [0, {k}) or {self.ignore_index}, "
                    f"got values in [{int(values.min())}, {int(values.max())}]"
                )
        counts = torch.bincount(gt * k + pred, minlength=k * k).reshape(k, k)  # rows GT, cols pred
        self._confusion += counts.numpy()

    def state(self) -> np.ndarray:
        return self._confusion.copy()

    def merge(self, states: list[np.ndarray]) -> None:
        for confusion in states:
            if confusion.shape != self._confusion.shape:
                raise ValueError(
                    f"state is a {confusion.shape} confusion matrix, expected {self._confusion.shape}"
                )
            self._confusion += confusion

    def evaluate(self) -> dict[str, float | dict]:
        confusion = self._confusion.astype(np.float64)
        correct = np.diag(confusion)  # (K,)
        gt_area, pred_area = confusion.sum(1), confusion.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = correct / (gt_area + pred_area - correct)  # NaN where the class never occurs
            acc = correct / gt_area  # NaN where the class is not in GT
        total = confusion.sum()
        metrics: dict[str, float | dict] = {
            "miou": _nanmean_percent(iou),
            "macc": _nanmean_percent(acc),
            "aacc": 100 * float(correct.sum() / total) if total else float("nan"),
        }
        metrics["per_class"] = {
            name: {"iou": 100 * float(iou[k]), "acc": 100 * float(acc[k])}
            for k, name in enumerate(self.class_names)
            if not np.isnan(iou[k])
        }
        return metrics


def _nanmean_percent(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return 100 * float(finite.mean()) if finite.size else float("nan")

"""Mask AP with pycocotools' COCOeval (``segm``), from in-memory predictions and targets.

Each image's thing masks (labels < T) become COCO ground truth (crowd kept as ``iscrowd`` so COCOeval
ignores matches to it) and each predicted mask a result, both RLE-encoded right away so the state stays
small. Category ids inside COCO are ``label + 1`` and annotation ids start at 1 (COCOeval treats id 0 as
"unmatched").
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from knet.evaluation._common import check_same_size, default_class_names
from knet.structures import Prediction

# COCOeval.stats indices for the mask metrics we report.
_STAT_KEYS = {"mask_ap": 0, "mask_ap50": 1, "mask_ap75": 2, "mask_aps": 3, "mask_apm": 4, "mask_apl": 5}


def encode_masks(masks: Tensor) -> list[dict]:
    """(M, H, W) bool -> M COCO RLEs with ``counts`` as str (JSON-ready)."""
    if masks.shape[0] == 0:
        return []
    array = np.asfortranarray(masks.cpu().numpy().astype(np.uint8).transpose(1, 2, 0))  # (H, W, M)
    rles = mask_utils.encode(array)
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


@dataclass
class InstanceState:
    """Everything COCOeval needs, as plain lists: images, GT annotations, detections."""

    images: list[dict] = field(default_factory=list)
    annotations: list[dict] = field(default_factory=list)
    detections: list[dict] = field(default_factory=list)
    has_image_ids: bool = True


class InstanceEvaluator:
    """COCO mask AP (AP, AP50, AP75, APs/m/l, in percent) over thing classes ``[0, T)``.

    Metrics COCOeval cannot define (no GT in an area range) are NaN instead of COCO's -1.
    """

    def __init__(self, num_thing_classes: int, class_names: list[str] | None = None) -> None:
        if num_thing_classes < 1:
            raise ValueError(f"num_thing_classes={num_thing_classes}: mask AP needs thing classes")
        self.num_thing_classes = num_thing_classes
        self.class_names = default_class_names(class_names, num_thing_classes)
        self._state = InstanceState()

    def reset(self) -> None:
        self._state = InstanceState()

    def process(self, predictions: list[Prediction], targets: list[dict]) -> None:
        """Add images: predictions need ``.instance``; targets have ``labels``, ``masks``, optional
        ``iscrowd`` and ``image_id`` (without it images are numbered in arrival order). A target with
        ``"skipped"`` (an unreadable image ``KNetDataset`` left out under ``skip_invalid``) is not scored."""
        if len(predictions) != len(targets):
            raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
        for prediction, target in zip(predictions, targets):
            if target.get("skipped"):
                continue
            if prediction.instance is None:
                raise ValueError(
                    "prediction has no instance part; build the model with inference.instance_on=True"
                )
            if "image_id" in target:
                image_id = int(target["image_id"])
            else:
                image_id = len(self._state.images) + 1
                self._state.has_image_ids = False
            masks, labels = target["masks"].bool().cpu(), target["labels"].long().cpu()
            height, width = int(masks.shape[-2]), int(masks.shape[-1])
            check_same_size("instance masks", tuple(prediction.instance.masks.shape[-2:]), (height, width))
            iscrowd = target.get("iscrowd")
            iscrowd = torch.zeros_like(labels, dtype=torch.bool) if iscrowd is None else iscrowd.bool().cpu()
            self._state.images.append({"id": image_id, "height": height, "width": width})
            things = labels < self.num_thing_classes
            for rle, label, crowd in zip(encode_masks(masks[things]), labels[things], iscrowd[things]):
                self._state.annotations.append(
                    {
                        "image_id": image_id,
                        "category_id": int(label) + 1,
                        "segmentation": rle,
                        "area": float(mask_utils.area(rle)),
                        "bbox": mask_utils.toBbox(rle).tolist(),
                        "iscrowd": int(crowd),
                    }
                )
            instance = prediction.instance
            if instance.labels.numel() and int(instance.labels.max()) >= self.num_thing_classes:
                raise ValueError(
                    f"instance prediction labels must be thing classes [0, {self.num_thing_classes}), "
                    f"got {int(instance.labels.max())}"
                )
            for rle, label, score in zip(
                encode_masks(instance.masks.bool()), instance.labels.long().cpu(), instance.scores.cpu()
            ):
                self._state.detections.append(
                    {
                        "image_id": image_id,
                        "category_id": int(label) + 1,
                        "segmentation": rle,
                        "score": float(score),
                    }
                )

    def state(self) -> InstanceState:
        return InstanceState(
            list(self._state.images),
            list(self._state.annotations),
            list(self._state.detections),
            self._state.has_image_ids,
        )

    def merge(self, states: list[InstanceState]) -> None:
        """Add states gathered from other evaluators; every image needs a dataset-wide ``image_id``."""
        parts = [self._state, *states]
        if sum(1 for part in parts if part.images) > 1 and not all(p.has_image_ids for p in parts):
            raise ValueError(
                "cannot merge instance evaluator states whose targets had no 'image_id': images "
                "would collide; give every target a unique target['image_id']"
            )
        seen = {image["id"] for image in self._state.images}
        for state in states:
            for image in state.images:
                if image["id"] in seen:
                    raise ValueError(f"image_id {image['id']} appears in more than one state")
                seen.add(image["id"])
            self._state.images.extend(state.images)
            self._state.annotations.extend(state.annotations)
            self._state.detections.extend(state.detections)
            self._state.has_image_ids = self._state.has_image_ids and state.has_image_ids

    def evaluate(self) -> dict[str, float | dict]:
        image_ids = [image["id"] for image in self._state.images]
        if len(set(image_ids)) != len(image_ids):
            raise ValueError("an image_id was processed more than once; image ids must be unique")
        categories = [{"id": k + 1, "name": name} for k, name in enumerate(self.class_names)]
        annotations = [dict(ann, id=i + 1) for i, ann in enumerate(self._state.annotations)]
        detections = [dict(det) for det in self._state.detections]
        return coco_mask_metrics(
            {"images": self._state.images, "annotations": annotations, "categories": categories},
            detections,
        )


def coco_mask_metrics(gt_dataset: dict, detections: list[dict]) -> dict[str, float | dict]:
    """Run COCOeval ``segm`` on a COCO GT dataset dict and result entries; metrics in percent."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = gt_dataset
        gt.createIndex()
        if detections:
            dt = gt.loadRes(detections)
        else:
            dt = COCO()
            dt.dataset = {
                "images": gt_dataset["images"],
                "annotations": [],
                "categories": gt_dataset["categories"],
            }
            dt.createIndex()
        coco_eval = COCOeval(gt, dt, iouType="segm")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    metrics: dict[str, float | dict] = {key: _percent(coco_eval.stats[i]) for key, i in _STAT_KEYS.items()}
    precision = coco_eval.eval["precision"]  # (T iou thrs, R recall, K classes, A areas, M max dets)
    per_class: dict[str, dict[str, float]] = {}
    for k, cat_id in enumerate(coco_eval.params.catIds):
        values = precision[:, :, k, 0, -1]
        values = values[values > -1]
        if values.size:
            per_class[gt.cats[cat_id]["name"]] = {"mask_ap": 100 * float(values.mean())}
    metrics["per_class"] = per_class
    return metrics


def _percent(value: float) -> float:
    return float("nan") if value < 0 else 100 * float(value)

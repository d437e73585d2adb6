"""Random small panoptic images (GT + prediction) shared by the evaluation tests and the benchmark.

GT: rectangles painted over each other on an id map (so segments never overlap), a VOID patch, some
thing segments marked crowd; stuff segments of one class are merged into one segment (one segment per
stuff class, as in COCO panoptic). Crowd segments of one class are merged in about half of the cases; in
the others every crowd segment gets one class and they stay apart, so an image holds several crowd
segments of a class (panopticapi then uses only the last one listed). The prediction starts from the GT
and is perturbed (repainted patches, relabelled segments, optional VOID) so matches and misses both occur.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from knet.structures import PanopticPrediction, Prediction


@dataclass
class PanopticCase:
    gt_ids: Tensor  # (H, W) int64, 0 = VOID, g = segment g - 1
    gt_labels: Tensor  # (G,)
    gt_iscrowd: Tensor  # (G,) bool
    pred_ids: Tensor  # (H, W) int64, 0 = VOID
    pred_labels: Tensor  # (P,)

    def target(self, image_id: int | None = None) -> dict:
        masks = self.gt_ids[None] == torch.arange(1, len(self.gt_labels) + 1)[:, None, None]
        target = {"labels": self.gt_labels, "masks": masks, "iscrowd": self.gt_iscrowd}
        if image_id is not None:
            target["image_id"] = image_id
        return target

    def prediction(self) -> Prediction:
        size = tuple(self.pred_ids.shape)
        is_thing = torch.zeros_like(self.pred_labels, dtype=torch.bool)
        scores = torch.ones(len(self.pred_labels))
        return Prediction(
            size, panoptic=PanopticPrediction(self.pred_ids, self.pred_labels, scores, is_thing)
        )


def _paint(generator: torch.Generator, ids: Tensor, value: int, min_size: int = 2) -> None:
    height, width = ids.shape
    h = int(torch.randint(min_size, height + 1, (1,), generator=generator))
    w = int(torch.randint(min_size, width + 1, (1,), generator=generator))
    y = int(torch.randint(0, height - h + 1, (1,), generator=generator))
    x = int(torch.randint(0, width - w + 1, (1,), generator=generator))
    ids[y : y + h, x : x + w] = value


def _compact(ids: Tensor, labels: Tensor, merge: Tensor) -> tuple[Tensor, Tensor]:
    """Renumber the segments present to 1..M; segments flagged in ``merge`` with the same label
    become one segment."""
    out = torch.zeros_like(ids)
    new_labels: list[int] = []
    merged_id: dict[int, int] = {}
    for old in ids.unique().tolist():
        if old == 0:
            continue
        label = int(labels[old - 1])
        if bool(merge[old - 1]) and label in merged_id:
            out[ids == old] = merged_id[label]
            continue
        new_labels.append(label)
        out[ids == old] = len(new_labels)
        if bool(merge[old - 1]):
            merged_id[label] = len(new_labels)
    return out, torch.tensor(new_labels, dtype=torch.int64)


def random_case(
    generator: torch.Generator,
    num_things: int,
    num_stuff: int,
    size: tuple[int, int] = (10, 12),
    num_segments: int = 6,
    with_crowd: bool = True,
    pred_void: bool = True,
) -> PanopticCase:
    num_classes = num_things + num_stuff
    gt = torch.zeros(size, dtype=torch.int64)
    for segment in range(1, num_segments + 1):
        _paint(generator, gt, segment)
    labels = torch.randint(0, num_classes, (num_segments,), generator=generator)
    crowd = (torch.rand(num_segments, generator=generator) < 0.4) & (labels < num_things) & with_crowd
    merge_crowds = bool(torch.rand(1, generator=generator) < 0.5)
    if not merge_crowds and bool(crowd.any()):  # several crowd segments of one class, kept apart
        labels = torch.where(crowd, labels[crowd][0], labels)
    if torch.rand(1, generator=generator) < 0.7:
        _paint(generator, gt, 0)  # a VOID patch
    is_stuff = labels >= num_things
    merged, gt_labels = _compact(gt, labels, is_stuff | (crowd & merge_crowds))
    gt_iscrowd = _crowd_flags(gt, merged, crowd)

    pred = merged.clone()
    pred_labels = gt_labels.clone()
    extra = len(pred_labels)
    for _ in range(int(torch.randint(1, 4, (1,), generator=generator))):
        extra += 1
        _paint(generator, pred, extra, min_size=1)
    new_labels = torch.randint(0, num_classes, (extra - len(pred_labels),), generator=generator)
    pred_labels = torch.cat([pred_labels, new_labels])
    flip = torch.rand(len(pred_labels), generator=generator) < 0.2
    pred_labels = torch.where(
        flip, torch.randint(0, num_classes, pred_labels.shape, generator=generator), pred_labels
    )
    if pred_void and torch.rand(1, generator=generator) < 0.5:
        _paint(generator, pred, 0, min_size=1)
    elif not pred_void and bool((pred == 0).any()):
        # fill GT-VOID pixels the prediction copied with a fresh segment so no pixel is predicted VOID
        pred[pred == 0] = len(pred_labels) + 1
        pred_labels = torch.cat([pred_labels, torch.randint(0, num_classes, (1,), generator=generator)])
    pred_ids, pred_labels = _compact(pred, pred_labels, pred_labels >= num_things)
    return PanopticCase(merged, gt_labels, gt_iscrowd, pred_ids, pred_labels)


def _crowd_flags(original: Tensor, merged: Tensor, crowd: Tensor) -> Tensor:
    """Crowd flag of every merged segment, read from the original segment ids it came from."""
    flags = torch.zeros(int(merged.max()), dtype=torch.bool)
    for new in merged.unique().tolist():
        if new == 0:
            continue
        old = int(original[merged == new][0])
        flags[new - 1] = bool(crowd[old - 1])
    return flags

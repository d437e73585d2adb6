"""A tiny in-memory generator of images of simple shapes with panoptic/instance targets, and a
straightforward reference PQ, for model tests that cannot wait for the data and evaluation packages.

Classes (contiguous ids, things first): 0 = square (red), 1 = disc (yellow); stuff 2 = sky (blue,
above a random horizon), 3 = grass (green, below it). Things occlude stuff and never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

NUM_THING_CLASSES = 2
NUM_STUFF_CLASSES = 2
_COLOURS = {0: (0.9, 0.1, 0.1), 1: (0.9, 0.9, 0.1), 2: (0.2, 0.3, 0.9), 3: (0.1, 0.7, 0.2)}


@dataclass
class ShapesBatch:
    images: Tensor  # (B, 3, H, W) float, roughly zero-mean
    targets: list[dict[str, Tensor]]  # labels int64 (M,), masks bool (M, H, W)


def _thing_mask(label: int, cy: int, cx: int, radius: int, height: int, width: int) -> Tensor:
    ys = torch.arange(height)[:, None]
    xs = torch.arange(width)[None, :]
    if label == 0:
        return ((ys - cy).abs() <= radius) & ((xs - cx).abs() <= radius)
    return (ys - cy) ** 2 + (xs - cx) ** 2 <= radius**2


def make_image(
    generator: torch.Generator,
    height: int,
    width: int,
    *,
    num_things: int,
    with_stuff: bool = True,
    instance_only: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One image (3, H, W) and its target. ``with_stuff=False`` leaves the background unlabelled (grey);
    ``instance_only`` drops the stuff masks from the target (the image still shows them)."""
    image = torch.full((3, height, width), 0.5)
    masks: list[Tensor] = []
    labels: list[int] = []
    occupied = torch.zeros(height, width, dtype=torch.bool)
    radius_max = max(3, min(height, width) // 6)
    attempts = 0
    while len(labels) < num_things and attempts < 200:
        attempts += 1
        label = int(torch.randint(0, NUM_THING_CLASSES, (1,), generator=generator))
        radius = int(torch.randint(radius_max // 2, radius_max + 1, (1,), generator=generator))
        cy = int(torch.randint(radius, height - radius, (1,), generator=generator))
        cx = int(torch.randint(radius, width - radius, (1,), generator=generator))
        mask = _thing_mask(label, cy, cx, radius, height, width)
        if (mask & occupied).any():
            continue
        occupied |= mask
        masks.append(mask)
        labels.append(label)
    stuff_masks: list[tuple[int, Tensor]] = []
    if with_stuff:
        horizon = int(torch.randint(height // 4, 3 * height // 4, (1,), generator=generator))
        rows = torch.arange(height)[:, None].expand(height, width)
        stuff_masks = [(2, (rows < horizon) & ~occupied), (3, (rows >= horizon) & ~occupied)]
    for label, mask in stuff_masks:
        image[:, mask] = torch.tensor(_COLOURS[label])[:, None]
    for label, mask in zip(labels, masks, strict=True):
        image[:, mask] = torch.tensor(_COLOURS[label])[:, None]
    image = image + 0.05 * torch.randn(image.shape, generator=generator)
    if not instance_only:
        for label, mask in stuff_masks:
            if mask.any():
                masks.append(mask)
                labels.append(label)
    target = {
        "labels": torch.tensor(labels, dtype=torch.int64),
        "masks": torch.stack(masks) if masks else torch.zeros(0, height, width, dtype=torch.bool),
    }
    return (image - 0.5) / 0.25, target


def make_batch(
    seed: int,
    batch: int,
    height: int,
    width: int,
    *,
    num_things: int = 2,
    empty_index: int | None = None,
    instance_only: bool = False,
) -> ShapesBatch:
    """``empty_index``: that image has no segments at all (no things, unlabelled background)."""
    generator = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for index in range(batch):
        empty = index == empty_index
        image, target = make_image(
            generator,
            height,
            width,
            num_things=0 if empty else num_things,
            with_stuff=not empty,
            instance_only=instance_only,
        )
        images.append(image)
        targets.append(target)
    return ShapesBatch(images=torch.stack(images), targets=targets)


Segments = list[tuple[int, Tensor]]  # (label, bool mask (H, W)) per segment


def reference_pq(images: list[tuple[Segments, Segments]], num_classes: int) -> float:
    """Panoptic quality over a set of images, the textbook way (Kirillov et al. 2019), in [0, 1].

    ``images`` holds (predicted segments, ground-truth segments) per image. A prediction matches a
    ground truth of the same class with IoU > 0.5 (unique when segments do not overlap). PQ per class =
    sum of matched IoUs / (TP + FP/2 + FN/2), averaged over the classes that occur at all.
    """
    tp_iou = [0.0] * num_classes
    tp, fp, fn = [0] * num_classes, [0] * num_classes, [0] * num_classes
    for pred_segments, gt_segments in images:
        matched: set[int] = set()
        for label, pred in pred_segments:
            hit = None
            for index, (gt_label, gt) in enumerate(gt_segments):
                if gt_label != label or index in matched:
                    continue
                iou = (pred & gt).sum().item() / max((pred | gt).sum().item(), 1)
                if iou > 0.5:
                    hit = (index, iou)
                    break
            if hit is None:
                fp[label] += 1
            else:
                matched.add(hit[0])
                tp[label] += 1
                tp_iou[label] += hit[1]
        for index, (gt_label, _) in enumerate(gt_segments):
            if index not in matched:
                fn[gt_label] += 1
    scores = [
        tp_iou[c] / (tp[c] + 0.5 * fp[c] + 0.5 * fn[c]) for c in range(num_classes) if tp[c] + fp[c] + fn[c]
    ]
    return sum(scores) / len(scores) if scores else 1.0

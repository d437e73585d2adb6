"""Per-image target dicts -> the reference's soft stride-4 mask targets (spec §1 "Data / GT", §8.6).

Masks are zero-padded to the padded batch size and bilinearly downsampled by ``stride`` without
re-binarising, so boundary pixels carry soft values in [0, 1].

Crowd segments (``iscrowd`` True) are dropped here: they are never matched and their pixels act as
background in every loss (negatives for BCE / focal / seg, unlabelled for the rank loss), which is what
the reference does because crowd instances never enter its ``gt_masks``. Evaluators handle crowd regions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class MaskTargets:
    """One image's targets at stride 4 of the padded size (h4, w4).

    thing_masks: (M_t, h4, w4) float in [0, 1]; thing_labels: (M_t,) int64 in [0, T).
    stuff_masks: (M_s, h4, w4) float, one per stuff class present; stuff_labels: (M_s,) int64 in [T, T+S),
        ascending.
    """

    thing_masks: Tensor
    thing_labels: Tensor
    stuff_masks: Tensor
    stuff_labels: Tensor


def downsampled_size(padded_size: tuple[int, int], stride: int) -> tuple[int, int]:
    """(Hp, Wp) -> (ceil(Hp / stride), ceil(Wp / stride)), the size of the stride-``stride`` targets."""
    return (-(-padded_size[0] // stride), -(-padded_size[1] // stride))


def soft_downsample(masks: Tensor, padded_size: tuple[int, int], stride: int) -> Tensor:
    """(M, h, w) bool/float -> (M, ceil(Hp/stride), ceil(Wp/stride)) float: zero-pad bottom/right, then
    bilinear (align_corners False), no re-binarisation."""
    height, width = masks.shape[-2:]
    size = downsampled_size(padded_size, stride)
    if masks.shape[0] == 0:
        return masks.new_zeros((0, *size), dtype=torch.float32)
    padded = F.pad(masks.float(), (0, padded_size[1] - width, 0, padded_size[0] - height))
    return F.interpolate(padded[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def prepare_targets(
    targets: list[dict[str, Any]],
    image_sizes: list[tuple[int, int]],
    padded_size: tuple[int, int],
    *,
    stride: int = 4,
    num_thing_classes: int,
    num_stuff_classes: int,
) -> list[MaskTargets]:
    """Split each image's segments into things and stuff and make their soft stride-4 masks.

    targets[i]: ``labels`` (M,) int64, ``masks`` (M, h_i, w_i) bool, optional ``iscrowd`` (M,) bool.
    Several masks of one stuff class (not expected: the data seam gives one per class) are merged by
    their union, so each present stuff class has exactly one target mask.
    """
    if len(targets) != len(image_sizes):
        raise ValueError(f"got {len(targets)} targets but {len(image_sizes)} image_sizes")
    num_classes = num_thing_classes + num_stuff_classes
    prepared = []
    for index, (target, size) in enumerate(zip(targets, image_sizes)):
        labels, masks = target["labels"], target["masks"]
        if size[0] > padded_size[0] or size[1] > padded_size[1]:
            raise ValueError(
                f"image_sizes[{index}] = {tuple(size)} does not fit in padded_size {tuple(padded_size)}"
            )
        if tuple(masks.shape[-2:]) != tuple(size):
            raise ValueError(
                f"targets[{index}]['masks'] is {tuple(masks.shape[-2:])}, expected image size {size}"
            )
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(
                f"targets[{index}]['labels'] must be in [0, {num_classes}) (things then stuff), "
                f"got {labels.min().item()}..{labels.max().item()}"
            )
        keep = torch.ones_like(labels, dtype=torch.bool)
        if target.get("iscrowd") is not None:
            keep = ~target["iscrowd"].to(torch.bool)
        is_thing = labels < num_thing_classes
        things = keep & is_thing
        stuff = keep & ~is_thing
        thing_masks = soft_downsample(masks[things], padded_size, stride)
        stuff_masks, stuff_labels = _stuff_per_class(masks[stuff], labels[stuff], padded_size, stride)
        prepared.append(MaskTargets(thing_masks, labels[things].clone(), stuff_masks, stuff_labels))
    return prepared


def _stuff_per_class(
    masks: Tensor, labels: Tensor, padded_size: tuple[int, int], stride: int
) -> tuple[Tensor, Tensor]:
    """(M, h, w), (M,) -> one union mask per distinct label, labels ascending, then soft-downsampled."""
    present, inverse = torch.unique(labels, sorted=True, return_inverse=True)
    if present.numel() == labels.numel():
        order = torch.argsort(inverse)
        return soft_downsample(masks[order], padded_size, stride), present
    union = masks.new_zeros((present.numel(), *masks.shape[-2:]), dtype=torch.float32)
    index = inverse[:, None, None].expand(masks.shape)
    union.scatter_reduce_(0, index, masks.float(), "amax")  # (M, h, w) -> (C_present, h, w)
    return soft_downsample(union, padded_size, stride), present

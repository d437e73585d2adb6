"""Helpers the evaluators share: turning a target's masks into one id map, class names."""

from __future__ import annotations

import torch
from torch import Tensor


def masks_to_id_map(masks: Tensor) -> Tensor:
    """(M, H, W) bool non-overlapping masks -> (H, W) int64 map, 0 where no mask, m + 1 inside mask m.

    Overlapping masks are refused: a pixel with two segments has no single ground truth.
    """
    if masks.dim() != 3:
        raise ValueError(f"target masks must be (M, H, W), got shape {tuple(masks.shape)}")
    masks = masks.bool()
    if masks.shape[0] == 0:
        return torch.zeros(masks.shape[1:], dtype=torch.int64)
    coverage = masks.sum(0)  # (H, W)
    if int(coverage.max()) > 1:
        raise ValueError(
            "target masks overlap; panoptic/semantic evaluation needs every pixel in at most one "
            "segment (resolve overlaps when building the targets)"
        )
    ids = torch.arange(1, masks.shape[0] + 1, dtype=torch.int64)  # (M,)
    return (masks.to(torch.int64) * ids[:, None, None]).sum(0)  # (M, H, W) -> (H, W)


def default_class_names(class_names: list[str] | None, num_classes: int) -> list[str]:
    """The given names (checked for length) or ``class_0 .. class_{K-1}``."""
    if class_names is None:
        return [f"class_{i}" for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(
            f"class_names has {len(class_names)} entries but there are {num_classes} classes; "
            "pass one name per contiguous class id"
        )
    return list(class_names)


def check_same_size(what: str, got: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(got) != tuple(expected):
        raise ValueError(
            f"{what} has size {tuple(got)} but the target masks are {tuple(expected)}; "
            "resize predictions to each image's unpadded size (Prediction.resized) before evaluating"
        )

"""The semantic variant's losses: softmax cross-entropy on every logit map (spec section 3).

The initial decode-head logits and each update stage's logits get a CE loss of weight ``seg_weight``
(1.0), the auxiliary FCN head one of ``aux_weight`` (0.4). Logits are resized bilinearly to the padded
label size; pixels outside every segment and the padding are ``ignore_index``. As in mmseg 0.x (which
the reference ran on), the mean is over all pixels of the padded batch, ignored pixels counting 0.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from knet.structures import KernelHeadOutput, StageOutput

IGNORE_INDEX = 255


def label_maps(
    targets: list[dict[str, Any]],
    image_sizes: list[tuple[int, int]],
    padded_size: tuple[int, int],
    *,
    ignore_index: int = IGNORE_INDEX,
    device: torch.device | None = None,
) -> Tensor:
    """Per-image segments (labels [M], masks [M, h, w]) -> one (B, Hp, Wp) int64 class map.

    A pixel takes the label of the first segment covering it; uncovered pixels and padding are ignored.
    """
    maps = torch.full((len(targets), *padded_size), ignore_index, dtype=torch.int64, device=device)
    for index, (target, (height, width)) in enumerate(zip(targets, image_sizes, strict=True)):
        labels, masks = target["labels"].to(device), target["masks"].to(device)
        if labels.numel() == 0:
            continue
        covered = masks.any(dim=0)  # (h, w)
        first = masks.to(torch.uint8).argmax(dim=0)  # (M, h, w) -> (h, w): first segment covering the pixel
        maps[index, :height, :width] = torch.where(covered, labels[first], ignore_index)
    return maps


def cross_entropy(logits: Tensor, labels: Tensor, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """logits (B, K, h, w) resized to labels (B, H, W); mean over all B*H*W pixels."""
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="none")
    return per_pixel.mean()


class SemanticCriterion:
    """(head, stages, targets) -> {"decode.loss_seg", "s{i}.loss_seg" ..., "aux.loss_seg"} (weighted)."""

    def __init__(
        self, *, num_classes: int, seg_weight: float, aux_weight: float, ignore_index: int = IGNORE_INDEX
    ) -> None:
        self.num_classes = num_classes
        self.seg_weight = seg_weight
        self.aux_weight = aux_weight
        self.ignore_index = ignore_index

    def __call__(
        self,
        *,
        head: KernelHeadOutput,
        stages: list[StageOutput],
        targets: list[dict[str, Any]],
        image_sizes: list[tuple[int, int]],
        padded_size: tuple[int, int],
    ) -> dict[str, Tensor]:
        labels = label_maps(
            targets, image_sizes, padded_size, ignore_index=self.ignore_index, device=head.mask_logits.device
        )
        losses = {"decode.loss_seg": self.seg_weight * self._ce(head.mask_logits, labels)}
        for index, stage in enumerate(stages):
            losses[f"s{index}.loss_seg"] = self.seg_weight * self._ce(stage.mask_logits, labels)
        if head.seg_logits is not None:
            losses["aux.loss_seg"] = self.aux_weight * self._ce(head.seg_logits, labels)
        return losses

    def _ce(self, logits: Tensor, labels: Tensor) -> Tensor:
        return cross_entropy(logits, labels, ignore_index=self.ignore_index)

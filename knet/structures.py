"""Typed results that cross module boundaries: per-stage head outputs and per-image predictions.

Shapes use B = batch, N = number of kernels, C = channels, K = number of classes,
h, w = feature resolution, H, W = image size (the unpadded input size of that image).
Class ids are contiguous training ids: things first ``[0, T)``, then stuff ``[T, T + S)``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class KernelHeadOutput:
    """What the initial kernel head gives the first update stage.

    features: (B, C, h, w) shared feature map every stage reads (stride 8 in the reference).
    kernels: (B, N, C) initial kernels (proposal kernels, plus stuff kernels for panoptic) when
        conv_kernel_size K == 1; (B, N, K*K, C) when K > 1 (tap k = row * K + col).
    mask_logits: (B, N, h, w) initial mask logits at feature resolution.
    seg_logits: (B, K, h, w) or None; the auxiliary dense semantic logits (panoptic / instance).
    """

    features: Tensor
    kernels: Tensor
    mask_logits: Tensor
    seg_logits: Tensor | None = None


@dataclass
class StageOutput:
    """One kernel-update stage's output.

    cls_logits: (B, N, K) sigmoid class logits, or None for the semantic variant (fixed class per kernel).
    mask_logits: (B, N, h, w) mask logits at feature resolution (passed on to the next stage).
    kernels: (B, N, C) updated kernels passed on to the next stage ((B, N, K*K, C) when K > 1): the
        post-FFN features, not the mask kernels that produced ``mask_logits``.
    """

    cls_logits: Tensor | None
    mask_logits: Tensor
    kernels: Tensor


@dataclass
class PanopticPrediction:
    """segment_map: (H, W) int64, 0 = VOID, segment ids 1..M index the per-segment tensors below
    (segment id i lives at row i - 1). labels, scores, is_thing: (M,)."""

    segment_map: Tensor
    labels: Tensor
    scores: Tensor
    is_thing: Tensor

    def resized(self, size: tuple[int, int]) -> PanopticPrediction:
        return PanopticPrediction(
            _resize_nearest(self.segment_map, size), self.labels, self.scores, self.is_thing
        )


@dataclass
class InstancePrediction:
    """masks: (M, H, W) bool; labels: (M,) int64; scores: (M,) float, sorted descending."""

    masks: Tensor
    labels: Tensor
    scores: Tensor

    def resized(self, size: tuple[int, int]) -> InstancePrediction:
        return InstancePrediction(_resize_nearest(self.masks, size), self.labels, self.scores)


@dataclass
class SemanticPrediction:
    """label_map: (H, W) int64 class per pixel; class_scores: (K, h, w) float or None, per-class
    scores at the model's output resolution (kept coarse on purpose: K x H x W floats at full
    image size would cost hundreds of MB for COCO-sized images). class_logits: (K, h, w), the semantic
    variant's raw per-class logits over the padded frame (class_scores is their softmax; label_map is
    their bilinear upsampling's argmax); None for the semantic part of a panoptic model, whose scores
    are mask votes, not logits."""

    label_map: Tensor
    class_scores: Tensor | None = None
    class_logits: Tensor | None = None

    def resized(self, size: tuple[int, int]) -> SemanticPrediction:
        return SemanticPrediction(_resize_nearest(self.label_map, size), self.class_scores, self.class_logits)


@dataclass
class Prediction:
    """Everything the model predicts for one image; a part is None when its task is switched off."""

    image_size: tuple[int, int]
    panoptic: PanopticPrediction | None = None
    instance: InstancePrediction | None = None
    semantic: SemanticPrediction | None = None

    def resized(self, size: tuple[int, int]) -> Prediction:
        """The same prediction at another image size (nearest neighbour on maps and masks), used to map
        results back to an image's original size after a test-time resize."""
        size = (int(size[0]), int(size[1]))
        return Prediction(
            image_size=size,
            panoptic=self.panoptic.resized(size) if self.panoptic is not None else None,
            instance=self.instance.resized(size) if self.instance is not None else None,
            semantic=self.semantic.resized(size) if self.semantic is not None else None,
        )


T = TypeVar("T")


def to_device(value: T, device: torch.device | str) -> T:
    """``value`` with every tensor inside it (dicts, lists, tuples, dataclasses such as ``Prediction``,
    nested) moved to ``device``; other values unchanged. Returns new containers, leaves ``value`` as is:
    predictions and targets go to the CPU this way before evaluation."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, device) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        moved = {
            f.name: to_device(getattr(value, f.name), device) for f in dataclasses.fields(value) if f.init
        }
        return dataclasses.replace(value, **moved)
    return value


def _resize_nearest(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest-neighbour resize of (H, W) or (M, H, W) integer/bool maps, preserving dtype."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    squeeze = maps.dim() == 2
    batched = maps[None] if squeeze else maps  # (M, H, W)
    if batched.shape[0] == 0:
        return batched.new_zeros((0, *size)) if not squeeze else maps.new_zeros(size)
    # Bool masks go through uint8, not float: a quarter of the memory for (M, H, W) masks.
    work_dtype = torch.uint8 if maps.dtype == torch.bool else torch.float32
    resized = F.interpolate(batched[:, None].to(work_dtype), size=size, mode="nearest-exact")[:, 0]
    resized = resized.to(maps.dtype)
    return resized[0] if squeeze else resized

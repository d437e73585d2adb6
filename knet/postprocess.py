"""Last-stage logits -> per-image predictions: panoptic merge, instance top-k, semantic maps (spec §4).

Mask probabilities follow the reference's rescale: mask logits (stride 8) -> bilinear x mask_upsample_stride
-> sigmoid -> bilinear to the padded batch size -> crop to the image size (align_corners False throughout).
Predictions come back at each image's (unpadded) size; mapping to an original size before a test-time
resize is ``Prediction.resized``.

Upstream's stuff_score_thr, iou_thr and stuff_max_area are never read by its merge code, so they are not
options here; the merge uses only mask_thr, instance_score_thr and overlap_thr.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from knet.structures import InstancePrediction, PanopticPrediction, Prediction, SemanticPrediction


def mask_probabilities(
    mask_logits: Tensor, image_size: tuple[int, int], padded_size: tuple[int, int], upsample_stride: int
) -> Tensor:
    """(N, h8, w8) logits of one image -> (N, H, W) probabilities at the image size."""
    logits = mask_logits[None].float()  # (N, h8, w8) -> (1, N, h8, w8)
    if upsample_stride > 1:
        logits = F.interpolate(logits, scale_factor=upsample_stride, mode="bilinear", align_corners=False)
    probs = F.interpolate(logits.sigmoid(), size=padded_size, mode="bilinear", align_corners=False)
    return probs[0, :, : image_size[0], : image_size[1]]


def pixel_owner(scores: Tensor, mask_probs: Tensor) -> Tensor:
    """scores (N,), mask_probs (N, H, W) -> (H, W) int64: argmax_k score_k * prob_k per pixel."""
    return (scores[:, None, None] * mask_probs).argmax(0)  # (N, H, W) -> (H, W)


def panoptic_merge(
    scores: Tensor,
    labels: Tensor,
    is_thing: Tensor,
    mask_probs: Tensor,
    *,
    mask_thr: float,
    instance_score_thr: float,
    overlap_thr: float,
    owner: Tensor | None = None,
) -> PanopticPrediction:
    """scores, labels, is_thing (N,); mask_probs (N, H, W) -> panoptic map with segment ids 1..M (0 = VOID).

    Every pixel goes to argmax_k score_k * prob_k over ALL kernels; then kernels are visited by descending
    score: things below ``instance_score_thr`` are dropped (their pixels stay VOID; stuff has no score
    threshold); a kept kernel becomes a segment when its claimed area > 0, its area with prob >= mask_thr
    is > 0, and claimed / that area >= ``overlap_thr``. Claimed regions are disjoint, so the decisions are
    independent and are taken for all kernels at once. Unlike the reference (ids from 0, colliding with
    VOID), segment ids start at 1, in descending score order. ``owner``: ``pixel_owner(scores, mask_probs)``
    when the caller already has it (it is the costliest step at full image size).
    """
    num_kernels = scores.shape[0]
    owner = pixel_owner(scores, mask_probs) if owner is None else owner  # (H, W) kernel index
    claimed = torch.bincount(owner.flatten(), minlength=num_kernels)  # (N,)
    original = (mask_probs >= mask_thr).flatten(1).sum(1)  # (N,)
    kept = ~(is_thing & (scores < instance_score_thr))
    ratio = claimed.float() / original.clamp(min=1).float()
    segment = kept & (claimed > 0) & (original > 0) & (ratio >= overlap_thr)
    order = torch.argsort(scores, descending=True, stable=True)
    ordered = order[segment[order]]  # the segment kernels, best first
    segment_ids = torch.zeros(num_kernels, dtype=torch.int64, device=scores.device)
    segment_ids[ordered] = torch.arange(1, ordered.numel() + 1, device=scores.device)
    return PanopticPrediction(
        segment_map=segment_ids[owner],
        labels=labels[ordered].to(torch.int64),
        scores=scores[ordered],
        is_thing=is_thing[ordered],
    )


def instance_topk(
    class_probs: Tensor, mask_probs: Tensor, *, max_per_image: int, mask_thr: float
) -> InstancePrediction:
    """class_probs (P, T) sigmoid scores, mask_probs (P, H, W) -> the top ``max_per_image`` (kernel, class)
    pairs over the flattened scores, no NMS and no threshold; one kernel may give several labels."""
    num_classes = class_probs.shape[1]
    top = min(max_per_image, class_probs.numel())
    scores, flat = class_probs.flatten().topk(top, sorted=True)  # (P, T) -> (P*T,) -> (top,)
    kernels = torch.div(flat, num_classes, rounding_mode="floor")
    return InstancePrediction(masks=mask_probs[kernels] > mask_thr, labels=flat % num_classes, scores=scores)


def semantic_from_kernels(
    scores: Tensor,
    labels: Tensor,
    mask_probs: Tensor,
    coarse_probs: Tensor,
    num_classes: int,
    *,
    owner: Tensor | None = None,
) -> SemanticPrediction:
    """Semantic map of a panoptic model. Rule: each kernel votes only for its own label with
    score * mask probability, a class's score is the best vote, and a pixel takes the best class; so the
    label map equals the labels of the panoptic argmax before any threshold. (A sum over kernels, as in
    Mask2Former, lets 100 low-score sigmoid kernels outvote a confident stuff kernel.)

    scores, labels (N,); mask_probs (N, H, W); coarse_probs (N, h, w) -> label_map (H, W),
    class_scores (num_classes, h, w) (0 for classes no kernel voted for). ``owner`` as in ``panoptic_merge``.
    """
    owner = pixel_owner(scores, mask_probs) if owner is None else owner  # (H, W)
    votes = scores[:, None, None] * coarse_probs  # (N, h, w)
    class_scores = votes.new_zeros((num_classes, *votes.shape[1:]))
    index = labels[:, None, None].expand(votes.shape)
    class_scores.scatter_reduce_(0, index, votes, "amax")  # (N, h, w) -> (K, h, w)
    return SemanticPrediction(label_map=labels[owner].to(torch.int64), class_scores=class_scores)


def semantic_inference(
    class_logits: Tensor, image_sizes: list[tuple[int, int]], padded_size: tuple[int, int]
) -> list[SemanticPrediction]:
    """Semantic variant: class_logits (B, K, h, w) -> bilinear to the padded size, crop, argmax.

    class_scores keep the softmax at the coarse (h, w) resolution over the whole padded frame.
    """
    predictions = []
    for b, (height, width) in enumerate(image_sizes):
        logits = F.interpolate(
            class_logits[b : b + 1].float(), size=padded_size, mode="bilinear", align_corners=False
        )
        label_map = logits[0, :, :height, :width].argmax(0)  # (K, H, W) -> (H, W)
        predictions.append(
            SemanticPrediction(label_map=label_map, class_scores=class_logits[b].float().softmax(0))
        )
    return predictions


class PostProcessor:
    """(B, N, K) class logits + (B, N, h8, w8) mask logits -> one ``Prediction`` per image.

    Kernels are laid out as ``num_proposals`` thing kernels, then (panoptic) the S stuff kernels, stuff
    kernel j owning class T + j.
    """

    def __init__(
        self,
        *,
        task: Literal["panoptic", "instance"],
        num_thing_classes: int,
        num_stuff_classes: int,
        num_proposals: int,
        max_per_image: int = 100,
        mask_thr: float = 0.5,
        instance_score_thr: float = 0.3,
        overlap_thr: float = 0.6,
        panoptic_on: bool,
        instance_on: bool,
        semantic_on: bool,
        mask_upsample_stride: int = 2,
    ) -> None:
        if task not in ("panoptic", "instance"):
            raise ValueError(
                f"task must be 'panoptic' or 'instance', got {task!r} (semantic: semantic_inference)"
            )
        if task == "instance" and (panoptic_on or semantic_on or num_stuff_classes):
            raise ValueError(
                "an instance model has no stuff kernels: set num_stuff_classes=0, panoptic_on=False, semantic_on=False"
            )
        if not (panoptic_on or instance_on or semantic_on):
            raise ValueError("switch on at least one of panoptic_on, instance_on, semantic_on")
        if max_per_image < 1:
            raise ValueError(f"max_per_image must be >= 1, got {max_per_image}")
        for name, value in (
            ("mask_thr", mask_thr),
            ("instance_score_thr", instance_score_thr),
            ("overlap_thr", overlap_thr),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.task = task
        self.num_thing_classes, self.num_stuff_classes = num_thing_classes, num_stuff_classes
        self.num_proposals = num_proposals
        self.max_per_image, self.mask_thr = max_per_image, mask_thr
        self.instance_score_thr, self.overlap_thr = instance_score_thr, overlap_thr
        self.panoptic_on, self.instance_on, self.semantic_on = panoptic_on, instance_on, semantic_on
        self.mask_upsample_stride = mask_upsample_stride

    def __call__(
        self,
        cls_logits: Tensor,
        mask_logits: Tensor,
        image_sizes: list[tuple[int, int]],
        padded_size: tuple[int, int],
    ) -> list[Prediction]:
        expected = self.num_proposals + self.num_stuff_classes
        if cls_logits is None or mask_logits.shape[1] != expected or cls_logits.shape[1] != expected:
            got = None if cls_logits is None else tuple(cls_logits.shape)
            raise ValueError(
                f"expected {expected} kernels (num_proposals + num_stuff_classes) with class logits, got "
                f"cls_logits {got} and mask_logits {tuple(mask_logits.shape)}"
            )
        return [
            self._one_image(cls_logits[b].float().sigmoid(), mask_logits[b], size, padded_size)
            for b, size in enumerate(image_sizes)
        ]

    def _one_image(
        self, class_probs: Tensor, mask_logits: Tensor, size: tuple[int, int], padded_size: tuple[int, int]
    ) -> Prediction:
        """class_probs (N, K) sigmoid; mask_logits (N, h8, w8)."""
        size = (int(size[0]), int(size[1]))
        probs = mask_probabilities(mask_logits, size, padded_size, self.mask_upsample_stride)  # (N, H, W)
        prediction = Prediction(image_size=size)
        things = class_probs[: self.num_proposals, : self.num_thing_classes]  # (P, T)
        if self.instance_on:
            prediction.instance = instance_topk(
                things, probs[: self.num_proposals], max_per_image=self.max_per_image, mask_thr=self.mask_thr
            )
        if self.panoptic_on or self.semantic_on:
            scores, labels, is_thing = self._kernel_scores(class_probs, things)
            owner = pixel_owner(scores, probs)  # shared by the panoptic and semantic parts
            if self.panoptic_on:
                prediction.panoptic = panoptic_merge(
                    scores,
                    labels,
                    is_thing,
                    probs,
                    mask_thr=self.mask_thr,
                    instance_score_thr=self.instance_score_thr,
                    overlap_thr=self.overlap_thr,
                    owner=owner,
                )
            if self.semantic_on:
                coarse = mask_logits.float().sigmoid()
                prediction.semantic = semantic_from_kernels(
                    scores,
                    labels,
                    probs,
                    coarse,
                    self.num_thing_classes + self.num_stuff_classes,
                    owner=owner,
                )
        return prediction

    def _kernel_scores(self, class_probs: Tensor, things: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Thing kernels: best thing class; stuff kernel j: its own class T + j. -> scores, labels, is_thing (N,)."""
        thing_scores, thing_labels = things.max(1)
        stuff_block = class_probs[self.num_proposals :, self.num_thing_classes :]  # (S, S)
        stuff_scores = stuff_block.diagonal()
        stuff_labels = (
            torch.arange(self.num_stuff_classes, device=class_probs.device) + self.num_thing_classes
        )
        scores = torch.cat([thing_scores, stuff_scores])
        labels = torch.cat([thing_labels, stuff_labels])
        is_thing = torch.arange(scores.shape[0], device=scores.device) < self.num_proposals
        return scores, labels, is_thing

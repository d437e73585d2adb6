"""K-Net's training losses for the kernel head ("rpn") and every update stage (spec §1, §2, §8).

Per stage s: cls_weight * focal + mask_weight * BCE + dice_weight * dice (+ rank_weight * rank when
panoptic); the RPN adds seg_weight * dense focal and has no class loss. Stage s is matched with stage
s-1's detached predictions (stage 0 with the RPN masks and no class cost); stuff kernels are assigned by
identity. All losses run at stride 4: mask logits are upsampled bilinearly by ``mask_upsample_stride``.

Normalisation, as in the reference: the focal class loss is divided by the number of positive kernels
(averaged over ranks when ``torch.distributed`` is initialised, clamped >= 1); BCE is a mean over the
positive masks' pixels, dice a mean over positive masks (local to the rank, like the reference); the rank
loss is a mean over all B*h*w pixels including unlabelled ones (spec quirk 6, kept on purpose so the loss
scale matches the published weights); the dense seg focal loss is divided by the labelled pixel count.

Upstream quirks, decided: an RPN without positives still reports ``rpn.loss_rank`` (0) under its own
key (upstream logs it as ``loss_rank``); instance batches of any size work (upstream's two hard-coded
``None`` semantic targets truncate batches above 2 images per GPU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from knet.matcher import HungarianMatcher
from knet.structures import KernelHeadOutput, StageOutput
from knet.targets import MaskTargets, prepare_targets

_TARGET_STRIDE = 4
_IGNORE = -1


@dataclass
class Positives:
    """The supervised kernels of one image, ascending kernel index: kernel_indices, labels (Q,) int64,
    masks (Q, h4, w4) soft targets."""

    kernel_indices: Tensor
    labels: Tensor
    masks: Tensor


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise focal loss (no reduction): BCE * (alpha_t) * (1 - p_t)^gamma."""
    prob = logits.sigmoid()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return bce * alpha_t * (1 - p_t).pow(gamma)


def last_writer_index(foreground: Tensor) -> Tensor:
    """(Q, h, w) bool -> (h, w) int64: the largest q whose mask covers the pixel, or -1 (later masks
    overwrite earlier ones, as the reference's sequential ``r[mask > 0] = q`` does)."""
    order = torch.arange(foreground.shape[0], device=foreground.device)[:, None, None]
    if foreground.shape[0] == 0:
        return torch.full(foreground.shape[1:], -1, dtype=torch.int64, device=foreground.device)
    return torch.where(foreground, order, -1).amax(0)


class KNetCriterion(nn.Module):
    """Weighted losses ``{"rpn.loss_mask", ..., "s{i}.loss_cls", ...}`` from the head and stage outputs."""

    def __init__(
        self,
        *,
        num_thing_classes: int,
        num_stuff_classes: int,
        num_proposals: int,
        panoptic: bool,
        matcher: HungarianMatcher,
        cls_weight: float = 2.0,
        mask_weight: float = 1.0,
        dice_weight: float = 4.0,
        rank_weight: float = 0.1,
        seg_weight: float = 1.0,
        use_rank_loss: bool,
        mask_upsample_stride: int = 2,
    ) -> None:
        super().__init__()
        if num_thing_classes < 1:
            raise ValueError(f"num_thing_classes must be >= 1, got {num_thing_classes}")
        if num_stuff_classes < 0 or (not panoptic and num_stuff_classes != 0):
            raise ValueError(
                f"num_stuff_classes = {num_stuff_classes}: must be >= 0, and 0 when panoptic is False"
            )
        if num_proposals < 1:
            raise ValueError(f"num_proposals must be >= 1, got {num_proposals}")
        if mask_upsample_stride < 1:
            raise ValueError(f"mask_upsample_stride must be >= 1, got {mask_upsample_stride}")
        for name, value in (
            ("cls_weight", cls_weight),
            ("mask_weight", mask_weight),
            ("dice_weight", dice_weight),
            ("rank_weight", rank_weight),
            ("seg_weight", seg_weight),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.num_thing_classes = num_thing_classes
        self.num_stuff_classes = num_stuff_classes
        self.num_proposals = num_proposals
        self.panoptic = panoptic
        self.matcher = matcher
        self.cls_weight, self.mask_weight, self.dice_weight = cls_weight, mask_weight, dice_weight
        self.rank_weight, self.seg_weight = rank_weight, seg_weight
        self.use_rank_loss = use_rank_loss
        self.mask_upsample_stride = mask_upsample_stride

    @property
    def num_classes(self) -> int:
        return self.num_thing_classes + self.num_stuff_classes

    def forward(
        self,
        head: KernelHeadOutput,
        stages: list[StageOutput],
        targets: list[dict[str, Any]],
        image_sizes: list[tuple[int, int]],
        padded_size: tuple[int, int],
    ) -> dict[str, Tensor]:
        prepared = prepare_targets(
            targets,
            image_sizes,
            padded_size,
            stride=_TARGET_STRIDE,
            num_thing_classes=self.num_thing_classes,
            num_stuff_classes=self.num_stuff_classes,
        )
        prepared = [self._to_device(t, head.mask_logits.device) for t in prepared]
        losses: dict[str, Tensor] = {}
        rpn_masks = self._upsample(head.mask_logits[:, : self.num_proposals], prepared)  # (B, P, h4, w4)
        assignment = self.matcher(rpn_masks.detach(), None, prepared)
        rpn_positives = self._positives(assignment, prepared, with_stuff=False)
        losses["rpn.loss_mask"] = self.loss_mask(rpn_masks, rpn_positives)
        losses["rpn.loss_dice"] = self.loss_dice(rpn_masks, rpn_positives)
        if self.use_rank_loss:
            losses["rpn.loss_rank"] = self.loss_rank(rpn_masks, rpn_positives)
        if head.seg_logits is not None:
            losses["rpn.loss_seg"] = self.loss_seg(
                self._upsample(head.seg_logits, prepared), rpn_positives, prepared
            )

        previous_masks, previous_cls = rpn_masks.detach(), None
        for index, stage in enumerate(stages):
            if index > 0:  # stage 0 reuses the RPN assignment: same predictions, same (class-free) cost
                assignment = self.matcher(previous_masks, previous_cls, prepared)
            stage_masks = self._upsample(stage.mask_logits, prepared)  # (B, N, h4, w4)
            positives = self._positives(assignment, prepared, with_stuff=self.panoptic)
            if stage.cls_logits is None:
                raise ValueError(f"stage {index} has no cls_logits; KNetCriterion needs class logits")
            losses[f"s{index}.loss_cls"] = self.loss_cls(stage.cls_logits, positives)
            losses[f"s{index}.loss_mask"] = self.loss_mask(stage_masks, positives)
            losses[f"s{index}.loss_dice"] = self.loss_dice(stage_masks, positives)
            if self.use_rank_loss:
                losses[f"s{index}.loss_rank"] = self.loss_rank(stage_masks, positives)
            previous_masks = stage_masks[:, : self.num_proposals].detach()
            previous_cls = stage.cls_logits[:, : self.num_proposals, : self.num_thing_classes].detach()
        return losses

    def loss_cls(self, cls_logits: Tensor, positives: list[Positives]) -> Tensor:
        """Sigmoid focal over (B, N, K) with per-class weights: thing kernels weight 0 on stuff logits,
        stuff kernel j weight 1 only on its own logit T + j; divided by the (rank-averaged) positives."""
        _, num_kernels, num_classes = cls_logits.shape
        if num_classes != self.num_classes:
            raise ValueError(
                f"cls_logits has {num_classes} classes but the criterion expects num_thing_classes + "
                f"num_stuff_classes = {self.num_classes}"
            )
        one_hot = torch.zeros_like(cls_logits)
        for b, pos in enumerate(positives):
            one_hot[b, pos.kernel_indices, pos.labels] = 1.0
        weights = self._label_weights(num_kernels, num_classes, cls_logits)
        loss = (sigmoid_focal_loss(cls_logits.float(), one_hot.float()) * weights).sum()
        return self.cls_weight * loss / self._num_positives(positives, cls_logits.device)

    def loss_mask(self, mask_logits: Tensor, positives: list[Positives]) -> Tensor:
        """BCE with logits, mean over every pixel of every positive mask; 0 without positives."""
        logits, targets = self._gather(mask_logits, positives)
        if logits.shape[0] == 0:
            return mask_logits.sum() * 0.0
        return self.mask_weight * F.binary_cross_entropy_with_logits(logits.float(), targets)

    def loss_dice(self, mask_logits: Tensor, positives: list[Positives]) -> Tensor:
        """1 - 2<p,t> / (|p|^2 + 1e-3 + |t|^2 + 1e-3) per positive mask, mean over masks."""
        logits, targets = self._gather(mask_logits, positives)
        if logits.shape[0] == 0:
            return mask_logits.sum() * 0.0
        probs = logits.float().sigmoid().flatten(1)  # (Q, h, w) -> (Q, h*w)
        targets = targets.flatten(1)
        numerator = 2 * (probs * targets).sum(1)
        denominator = probs.pow(2).sum(1) + 1e-3 + targets.pow(2).sum(1) + 1e-3
        return self.dice_weight * (1 - numerator / denominator).mean()

    def loss_rank(self, mask_logits: Tensor, positives: list[Positives]) -> Tensor:
        """Softmax CE over the kernel axis of (B, N, h, w) against each pixel's last covering positive
        kernel; unlabelled pixels count in the mean with loss 0 (mean over all B*h*w pixels)."""
        rank_targets = torch.stack([self._rank_target(pos) for pos in positives])  # (B, h, w)
        loss = F.cross_entropy(mask_logits.float(), rank_targets, ignore_index=_IGNORE, reduction="sum")
        return self.rank_weight * loss / rank_targets.numel()

    def loss_seg(self, seg_logits: Tensor, positives: list[Positives], prepared: list[MaskTargets]) -> Tensor:
        """Dense sigmoid focal on the RPN's (B, C, h4, w4) logits: stuff pixels (mask > 0) from the stuff
        targets, then thing pixels from the matched thing targets on top, the rest background (all-zero
        one-hot); divided by the number of non-background pixels (>= 1)."""
        num_channels = seg_logits.shape[1]
        class_maps = []
        for pos, target in zip(positives, prepared):
            masks = torch.cat([target.stuff_masks, pos.masks])  # stuff first, things overwrite
            labels = torch.cat([target.stuff_labels, pos.labels])
            writer = last_writer_index(masks > 0)  # (h, w); -1 picks the appended background label
            class_maps.append(torch.cat([labels, labels.new_tensor([num_channels])])[writer])
        class_map = torch.stack(class_maps)  # (B, h, w)
        one_hot = seg_logits.new_zeros(
            (class_map.shape[0], num_channels + 1, *class_map.shape[1:]), dtype=torch.float32
        )
        one_hot = one_hot.scatter_(1, class_map[:, None], 1.0)[
            :, :num_channels
        ]  # (B, C + 1, h, w) -> (B, C, h, w)
        labelled = (class_map < num_channels).sum().clamp(min=1)
        loss = sigmoid_focal_loss(seg_logits.float(), one_hot).sum() / labelled
        return self.seg_weight * loss

    def _positives(
        self, assignment: list[tuple[Tensor, Tensor]], prepared: list[MaskTargets], *, with_stuff: bool
    ) -> list[Positives]:
        """Matched thing kernels, plus (panoptic stages) stuff kernel P + (label - T) for each present
        stuff class, all in ascending kernel index."""
        result = []
        for (kernel_idx, target_idx), target in zip(assignment, prepared):
            device = target.thing_masks.device
            kernel_idx, target_idx = kernel_idx.to(device), target_idx.to(device)
            order = torch.argsort(kernel_idx)
            kernels = kernel_idx[order]
            labels = target.thing_labels[target_idx[order]]
            masks = target.thing_masks[target_idx[order]]
            if with_stuff:
                stuff_kernels = self.num_proposals + target.stuff_labels - self.num_thing_classes
                kernels = torch.cat([kernels, stuff_kernels])
                labels = torch.cat([labels, target.stuff_labels])
                masks = torch.cat([masks, target.stuff_masks])
            result.append(Positives(kernels, labels, masks))
        return result

    def _label_weights(self, num_kernels: int, num_classes: int, like: Tensor) -> Tensor:
        """(N, K): ones, except (panoptic) thing rows 0 on stuff columns and stuff rows = [0 | eye(S)]."""
        weights = like.new_ones((num_kernels, num_classes), dtype=torch.float32)
        if self.panoptic and self.num_stuff_classes:
            things, proposals = self.num_thing_classes, self.num_proposals
            weights[:proposals, things:] = 0.0
            weights[proposals:] = 0.0
            weights[proposals:, things:] = torch.eye(self.num_stuff_classes, device=like.device)
        return weights

    def _num_positives(self, positives: list[Positives], device: torch.device) -> Tensor:
        count = torch.tensor(float(sum(p.kernel_indices.numel() for p in positives)), device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
            count = count / dist.get_world_size()
        return count.clamp(min=1.0)

    @staticmethod
    def _gather(mask_logits: Tensor, positives: list[Positives]) -> tuple[Tensor, Tensor]:
        """-> positive logits (Q, h, w) and their soft targets (Q, h, w), concatenated over the batch."""
        logits = torch.cat([mask_logits[b, pos.kernel_indices] for b, pos in enumerate(positives)])
        targets = torch.cat([pos.masks for pos in positives]).to(torch.float32)
        return logits, targets

    @staticmethod
    def _rank_target(pos: Positives) -> Tensor:
        """(h, w) int64: the last positive kernel covering each pixel (mask > 0), else the ignore value."""
        writer = last_writer_index(pos.masks > 0)  # (h, w); -1 picks the appended ignore value
        return torch.cat([pos.kernel_indices, pos.kernel_indices.new_tensor([_IGNORE])])[writer]

    def _upsample(self, logits: Tensor, prepared: list[MaskTargets]) -> Tensor:
        """(B, N, h8, w8) -> (B, N, h4, w4) bilinear, checked against the targets' size."""
        if self.mask_upsample_stride > 1:
            logits = F.interpolate(
                logits, scale_factor=self.mask_upsample_stride, mode="bilinear", align_corners=False
            )
        expected = tuple(prepared[0].thing_masks.shape[-2:]) if prepared else tuple(logits.shape[-2:])
        if tuple(logits.shape[-2:]) != expected:
            raise ValueError(
                f"mask logits upsampled to {tuple(logits.shape[-2:])} do not match the stride-4 targets "
                f"{expected}; the padded size must be a multiple of 8 (size_divisor 32 guarantees it)"
            )
        return logits

    @staticmethod
    def _to_device(target: MaskTargets, device: torch.device) -> MaskTargets:
        return MaskTargets(
            target.thing_masks.to(device),
            target.thing_labels.to(device),
            target.stuff_masks.to(device),
            target.stuff_labels.to(device),
        )

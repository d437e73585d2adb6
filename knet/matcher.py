"""One-to-one Hungarian matching of thing kernels to ground-truth thing masks (spec §1 "Matcher").

Cost = cls_cost * focal cost (at the target's class column, when class logits are given)
     + dice_cost * dice cost (squared sums, + 1e-3 per sum) + mask_cost * agreement cost.
Everything is computed at the targets' resolution (stride 4) in float32 with autocast off.
Non-finite costs (a diverged model) are replaced by a large finite cost, so the assignment still
happens and the non-finite *loss* on those predictions is what the training loop reports, with its step.
"""

from __future__ import annotations

from typing import Protocol

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

_FOCAL_ALPHA = 0.25
_FOCAL_GAMMA = 2.0
_EPS = 1e-12
_NON_FINITE_COST = 1e6  # far above any finite cost (each term is bounded by a few units)


class ThingTargets(Protocol):
    """What the matcher reads from one image's targets (``knet.targets.MaskTargets`` fits)."""

    thing_masks: Tensor  # (M, h, w) soft float in [0, 1]
    thing_labels: Tensor  # (M,) int64


def focal_cost(cls_logits: Tensor, labels: Tensor) -> Tensor:
    """(N, K) logits, (M,) labels -> (N, M): alpha (1-p)^g (-log p) - (1-alpha) p^g (-log(1-p)) at the label."""
    prob = cls_logits.sigmoid()
    pos = _FOCAL_ALPHA * (1 - prob).pow(_FOCAL_GAMMA) * -(prob + _EPS).log()
    neg = (1 - _FOCAL_ALPHA) * prob.pow(_FOCAL_GAMMA) * -(1 - prob + _EPS).log()
    return (pos - neg)[:, labels]


def dice_cost(mask_probs: Tensor, targets: Tensor) -> Tensor:
    """(N, P) probabilities, (M, P) soft targets -> (N, M): -2<p,t> / (|p|^2 + 1e-3 + |t|^2 + 1e-3)."""
    numerator = 2 * mask_probs @ targets.T
    denominator = mask_probs.pow(2).sum(1)[:, None] + 1e-3 + targets.pow(2).sum(1)[None, :] + 1e-3
    return -numerator / denominator


def mask_agreement_cost(mask_probs: Tensor, targets: Tensor) -> Tensor:
    """(N, P), (M, P) -> (N, M): -(<p,t> + <1-p,1-t>) / P, the mean pixel agreement (not a BCE)."""
    agreement = mask_probs @ targets.T + (1 - mask_probs) @ (1 - targets).T
    return -agreement / mask_probs.shape[1]


class HungarianMatcher(nn.Module):
    """Assigns each ground-truth thing mask to exactly one kernel (DETR-style, per image).

    Rule for more targets than kernels: a one-to-one assignment would leave targets unsupervised
    without telling anyone, so ``forward`` raises ``ValueError`` naming both counts instead.
    """

    def __init__(self, *, cls_cost: float = 2.0, dice_cost: float = 4.0, mask_cost: float = 1.0) -> None:
        super().__init__()
        for name, value in (("cls_cost", cls_cost), ("dice_cost", dice_cost), ("mask_cost", mask_cost)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if cls_cost == 0 and dice_cost == 0 and mask_cost == 0:
            raise ValueError("at least one of cls_cost, dice_cost, mask_cost must be > 0")
        self.cls_cost, self.dice_cost, self.mask_cost = cls_cost, dice_cost, mask_cost

    @torch.no_grad()
    def cost_matrices(
        self, mask_logits: Tensor, cls_logits: Tensor | None, targets: list[ThingTargets]
    ) -> list[Tensor]:
        """Per image (N, M_b) float32 cost matrices, from one batched pass over all targets."""
        batch, num_kernels = mask_logits.shape[:2]
        with torch.autocast(device_type=mask_logits.device.type, enabled=False):
            probs = mask_logits.float().sigmoid().flatten(2)  # (B, N, h, w) -> (B, N, h*w)
            counts = [int(t.thing_labels.numel()) for t in targets]
            for index, count in enumerate(counts):
                if count > num_kernels:
                    raise ValueError(
                        f"image {index} has {count} thing targets but only {num_kernels} kernels; "
                        "raise num_proposals to at least the largest number of instances per image"
                    )
            if sum(counts) == 0:
                return [probs.new_zeros((num_kernels, 0)) for _ in range(batch)]
            all_masks = torch.cat([t.thing_masks.float().flatten(1) for t in targets]).to(probs)  # (M, h*w)
            all_labels = torch.cat([t.thing_labels for t in targets]).to(probs.device)  # (M,)
            flat_probs = probs.flatten(0, 1)  # (B*N, h*w)
            cost = self.dice_cost * dice_cost(flat_probs, all_masks)
            cost = cost + self.mask_cost * mask_agreement_cost(flat_probs, all_masks)
            if cls_logits is not None:
                cost = cost + self.cls_cost * focal_cost(cls_logits.float().flatten(0, 1), all_labels)
            cost = torch.nan_to_num(
                cost, nan=_NON_FINITE_COST, posinf=_NON_FINITE_COST, neginf=-_NON_FINITE_COST
            )
            cost = cost.view(batch, num_kernels, -1)  # (B*N, M) -> (B, N, M)
            return [c[b] for b, c in enumerate(cost.split(counts, dim=-1))]

    @torch.no_grad()
    def forward(
        self, mask_logits: Tensor, cls_logits: Tensor | None, targets: list[ThingTargets]
    ) -> list[tuple[Tensor, Tensor]]:
        """mask_logits (B, N, h, w) at the targets' resolution; cls_logits (B, N, K) or None (no class
        cost); targets: B items with ``thing_masks (M_b, h, w)`` and ``thing_labels (M_b,)``.

        Returns B pairs ``(kernel_indices, target_indices)``, int64 on CPU, each of length M_b, sorted by
        kernel index; every target is assigned to a distinct kernel.
        """
        if len(targets) != mask_logits.shape[0]:
            raise ValueError(f"got {len(targets)} targets for a batch of {mask_logits.shape[0]}")
        indices = []
        for cost in self.cost_matrices(mask_logits, cls_logits, targets):
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices

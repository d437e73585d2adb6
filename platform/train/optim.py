"""K-Net's optimisation recipe: AdamW with a smaller backbone learning rate, linear warmup, step decay.

Spec (paper §4, mmdet ``optimizer_config``): AdamW, lr 1e-4 (x0.25 on the backbone), weight decay 0.05,
gradient clipping at norm 1; linear warmup from ``warmup_ratio * lr`` over ``warmup_iters`` iterations,
then the lr is multiplied by ``lr_gamma`` at each epoch listed in ``lr_steps``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

BACKBONE_PREFIX = "backbone."


def param_groups(model: nn.Module, *, lr: float, backbone_lr_mult: float) -> list[dict]:
    """Two AdamW groups: parameters under ``model.backbone`` at ``lr * backbone_lr_mult``, the rest at
    ``lr``. Frozen parameters (``requires_grad=False``) are left out."""
    backbone, rest = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (backbone if name.startswith(BACKBONE_PREFIX) else rest).append(parameter)
    groups = [{"params": rest, "lr": lr, "name": "head"}]
    if backbone:
        groups.append({"params": backbone, "lr": lr * backbone_lr_mult, "name": "backbone"})
    return groups


def warmup_step_factor(
    *, warmup_iters: int, warmup_ratio: float, lr_steps: Sequence[int], lr_gamma: float, steps_per_epoch: int
) -> Callable[[int], float]:
    """The lr multiplier after ``step`` optimizer steps (a ``LambdaLR`` function).

    factor(step) = warmup(step) * gamma ** #(lr_steps <= epoch(step)), with epoch(step) =
    step // steps_per_epoch and warmup(step) = 1 - (1 - step / warmup_iters) * (1 - warmup_ratio)
    while step < warmup_iters (mmcv's linear warmup), else 1.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch={steps_per_epoch}: the training set gives no batch per worker")
    boundaries = sorted(int(epoch) for epoch in lr_steps)

    def factor(step: int) -> float:
        epoch = step // steps_per_epoch
        decay = lr_gamma ** sum(1 for boundary in boundaries if epoch >= boundary)
        if step < warmup_iters:
            return decay * (1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio))
        return decay

    return factor


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    backbone_lr_mult: float,
    weight_decay: float,
    betas: tuple[float, float],
) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        param_groups(model, lr=lr, backbone_lr_mult=backbone_lr_mult),
        lr=lr,
        betas=betas,
        weight_decay=weight_decay,
    )

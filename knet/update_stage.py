"""KernelUpdateHead: one K-Net stage (spec section 2): group, update, interact, predict.

Kernel layout: (B, N, C) when conv_kernel_size K == 1, (B, N, K*K, C) when K > 1.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from knet.kernel_head import dynamic_conv, group_features, prior_bias
from knet.kernel_updator import KernelUpdator
from knet.structures import StageOutput


def fc_ln_relu(channels: int, count: int) -> nn.Sequential:
    """``count`` x [Linear (no bias), LayerNorm, ReLU]."""
    layers: list[nn.Module] = []
    for _ in range(count):
        layers += [nn.Linear(channels, channels, bias=False), nn.LayerNorm(channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class KernelUpdateHead(nn.Module):
    """forward(features (B, C, h, w), kernels, mask_logits (B, N, h', w')) -> StageOutput.

    grouping "hard_sigmoid" (instance/panoptic): group features under sigmoid(mask) > hard_mask_thr, summed,
    no gradient through the mask. "softmax" (semantic): softmax over the kernel axis, with gradient.
    The returned kernels are the post-FFN features (not the fc_mask output, which only makes this stage's
    masks). ``updator_channels`` < channels runs the updator on channel chunks of that width with shared
    weights (the semantic 512-d heads use a 256-d updator).
    """

    def __init__(
        self,
        *,
        num_classes: int | None,
        channels: int,
        conv_kernel_size: int,
        feedforward_channels: int,
        num_heads: int,
        dropout: float,
        num_cls_fcs: int,
        num_mask_fcs: int,
        grouping: Literal["hard_sigmoid", "softmax"],
        hard_mask_thr: float,
        updator_channels: int | None = None,
        gate_sigmoid: bool = True,
        gate_norm_act: bool = False,
        activate_out: bool = False,
    ) -> None:
        super().__init__()
        if grouping not in ("hard_sigmoid", "softmax"):
            raise ValueError(f"grouping must be 'hard_sigmoid' or 'softmax', got {grouping!r}")
        updator_channels = updator_channels or channels
        if channels % updator_channels != 0:
            raise ValueError(f"updator_channels ({updator_channels}) must divide channels ({channels})")
        self.channels = channels
        self.conv_kernel_size = conv_kernel_size
        self.grouping = grouping
        self.hard_mask_thr = hard_mask_thr
        self.updator_channels = updator_channels
        embed = channels * conv_kernel_size**2
        self.feat_transform = nn.Conv2d(channels, channels, 1)
        self.kernel_update_conv = KernelUpdator(
            channels=updator_channels,
            gate_sigmoid=gate_sigmoid,
            gate_norm_act=gate_norm_act,
            activate_out=activate_out,
        )
        self.attention = nn.MultiheadAttention(embed, num_heads, dropout=dropout)
        self.attention_dropout = nn.Dropout(dropout)
        self.attention_norm = nn.LayerNorm(embed)
        self.ffn = nn.Sequential(
            nn.Linear(channels, feedforward_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(feedforward_channels, channels),
            nn.Dropout(dropout),
        )
        self.ffn_norm = nn.LayerNorm(channels)
        self.cls_fcs = fc_ln_relu(channels, num_cls_fcs) if num_classes is not None else None
        self.fc_cls = nn.Linear(channels, num_classes) if num_classes is not None else None
        self.mask_fcs = fc_ln_relu(channels, num_mask_fcs)
        self.fc_mask = nn.Linear(channels, channels)
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)
        # The reference's feat_transform is an mmcv ConvModule, whose own init zeroes the conv bias; K-Net's
        # init_weights then re-initialises only the matrices, so the bias stays 0 (not PyTorch's uniform).
        nn.init.zeros_(self.feat_transform.bias)
        if self.fc_cls is not None:
            nn.init.constant_(self.fc_cls.bias, prior_bias())

    def forward(self, features: Tensor, kernels: Tensor, mask_logits: Tensor) -> StageOutput:
        batch, num = mask_logits.shape[:2]
        taps = self.conv_kernel_size**2
        features = self.feat_transform(features)
        if mask_logits.shape[-2:] != features.shape[-2:]:
            mask_logits = F.interpolate(
                mask_logits, size=features.shape[-2:], mode="bilinear", align_corners=False
            )
        if self.grouping == "hard_sigmoid":
            weights = (mask_logits.sigmoid() > self.hard_mask_thr).to(features.dtype)
        else:
            weights = mask_logits.softmax(dim=1)
        grouped = group_features(weights, features)  # (B, N, C)
        kernels = kernels.reshape(
            batch, num, taps, self.channels
        )  # (B, N, C) or (B, N, KK, C) -> (B, N, KK, C)

        # updator on g = C / Cu chunks: (B, N, C) -> (B*N*g, Cu); (B, N, KK, C) -> (B*N*g, KK, Cu) for K = 1
        rows = batch * num * (self.channels // self.updator_channels)
        updated = self.kernel_update_conv(
            grouped.reshape(rows, self.updator_channels),
            kernels.reshape(rows, -1, self.updator_channels),
        )
        tokens = updated.reshape(batch, num, taps * self.channels).transpose(0, 1)  # (N, B, KK*C), seq first
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        tokens = self.attention_norm(tokens + self.attention_dropout(attended))  # post-norm
        kernels = tokens.transpose(0, 1).reshape(
            batch, num, taps, self.channels
        )  # (N, B, KK*C) -> (B, N, KK, C)
        kernels = self.ffn_norm(kernels + self.ffn(kernels))  # post-norm FFN; these kernels are passed on

        cls_logits = None
        if self.fc_cls is not None:
            cls_logits = self.fc_cls(self.cls_fcs(kernels.sum(dim=2)))  # (B, N, num_classes)
        mask_kernels = self.fc_mask(self.mask_fcs(kernels))  # (B, N, KK, C)
        if taps == 1:
            mask_kernels, kernels = mask_kernels[:, :, 0], kernels[:, :, 0]  # (B, N, 1, C) -> (B, N, C)
        new_mask_logits = dynamic_conv(features, mask_kernels, self.conv_kernel_size)
        return StageOutput(cls_logits=cls_logits, mask_logits=new_mask_logits, kernels=kernels)

"""ConvKernelHead (the reference's "rpn_head"): the initial kernels and masks (spec section 1).

Kernel layout everywhere in ``knet``: (B, N, C) when conv_kernel_size K == 1 (the fast path), and
(B, N, K*K, C) when K > 1 (tap index k = row * K + col of the K x K kernel).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.profiler import record_function

from knet.localization_fpn import LocalizationFPN, conv_gn_relu
from knet.structures import KernelHeadOutput

PRIOR_PROB = 0.01


def prior_bias() -> float:
    """Bias that makes a sigmoid start at PRIOR_PROB: -log((1 - p) / p) = -4.595."""
    return -math.log((1 - PRIOR_PROB) / PRIOR_PROB)


def dynamic_conv(features: Tensor, kernels: Tensor, kernel_size: int) -> Tensor:
    """Each image's kernels convolved with its own features.

    features (B, C, h, w); kernels (B, N, C) (K = 1) or (B, N, K*K, C) -> mask logits (B, N, h, w).
    """
    if kernel_size == 1:
        return torch.einsum("bnc,bchw->bnhw", kernels, features)
    batch, channels, height, width = features.shape
    num = kernels.shape[1]
    weight = kernels.reshape(batch * num, kernel_size, kernel_size, channels).permute(
        0, 3, 1, 2
    )  # (B*N, C, K, K)
    grouped = F.conv2d(
        features.reshape(1, batch * channels, height, width), weight, padding=kernel_size // 2, groups=batch
    )
    return grouped.reshape(batch, num, height, width)  # (1, B*N, h, w) -> (B, N, h, w)


def group_features(masks: Tensor, features: Tensor) -> Tensor:
    """Sum of features under each mask: masks (B, N, h, w), features (B, C, h, w) -> (B, N, C)."""
    return torch.einsum("bnhw,bchw->bnc", masks, features)


class ConvKernelHead(nn.Module):
    """FPN levels -> stride-8 shared features, initial kernels, initial mask logits, dense seg logits.

    forward([P2..P5]) -> KernelHeadOutput with features (B, C, h, w), kernels (B, N, C) or (B, N, K*K, C),
    mask_logits (B, N, h, w), seg_logits (B, T+S, h, w); h, w = H/8, W/8.
    ``num_stuff_classes`` > 0 (panoptic): N = num_proposals + S, the stuff kernels are the stuff rows of
    conv_seg and the stuff masks are its stuff logits (spec section 1, step 6).
    """

    def __init__(
        self,
        *,
        channels: int,
        num_proposals: int,
        num_thing_classes: int,
        num_stuff_classes: int,
        conv_kernel_size: int,
        hard_mask_thr: float,
    ) -> None:
        super().__init__()
        self.num_proposals = num_proposals
        self.num_thing_classes = num_thing_classes
        self.num_stuff_classes = num_stuff_classes
        self.conv_kernel_size = conv_kernel_size
        self.hard_mask_thr = hard_mask_thr
        self.localization_fpn = LocalizationFPN(channels=channels)
        self.loc_convs = conv_gn_relu(channels, channels, 1)
        self.seg_convs = conv_gn_relu(channels, channels, 1)
        self.init_kernels = nn.Conv2d(
            channels, num_proposals, conv_kernel_size, padding=conv_kernel_size // 2, bias=False
        )
        self.conv_seg = nn.Conv2d(channels, num_thing_classes + num_stuff_classes, 1)
        nn.init.normal_(self.init_kernels.weight, std=1.0)  # std 1, not 0.01 (spec section 8.9)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.constant_(self.conv_seg.bias, prior_bias())
        for conv in (self.loc_convs[0], self.seg_convs[0]):
            nn.init.normal_(conv.weight, std=0.01)

    def forward(self, pyramid: list[Tensor]) -> KernelHeadOutput:
        with record_function("knet.localization_fpn"):
            loc_features, aux_features = self.localization_fpn(pyramid)
        loc_features = self.loc_convs(loc_features)
        sem_features = self.seg_convs(aux_features)
        mask_logits = self.init_kernels(loc_features)  # (B, N, h, w)
        seg_logits = self.conv_seg(sem_features)  # (B, T+S, h, w)
        features = sem_features + loc_features
        batch, channels = features.shape[:2]
        kernels = self._thing_kernels()[None].expand(batch, -1, -1, -1)  # (B, N, K*K, C)
        hard = (mask_logits.sigmoid() > self.hard_mask_thr).to(features.dtype)
        kernels = kernels + group_features(hard, features)[:, :, None, :]  # obj feature, broadcast over K*K
        if self.num_stuff_classes > 0:
            stuff = self._stuff_kernels()[None].expand(batch, -1, -1, -1)  # (B, S, K*K, C)
            kernels = torch.cat([kernels, stuff], dim=1)
            mask_logits = torch.cat([mask_logits, seg_logits[:, self.num_thing_classes :]], dim=1)
        if self.conv_kernel_size == 1:
            kernels = kernels[:, :, 0]  # (B, N, 1, C) -> (B, N, C)
        return KernelHeadOutput(
            features=features, kernels=kernels, mask_logits=mask_logits, seg_logits=seg_logits
        )

    def _thing_kernels(self) -> Tensor:
        """init_kernels weight (N, C, K, K) -> (N, K*K, C)."""
        weight = self.init_kernels.weight
        return weight.flatten(2).transpose(1, 2)

    def _stuff_kernels(self) -> Tensor:
        """Stuff rows of conv_seg (S, C, 1, 1) -> (S, K*K, C); for K > 1 the weight sits at the centre tap,
        so the stuff kernel computes the same logits (without the conv_seg bias, as upstream)."""
        weight = self.conv_seg.weight[self.num_thing_classes :, :, 0, 0]  # (S, C)
        taps = self.conv_kernel_size**2
        if taps == 1:
            return weight[:, None, :]
        stuff = weight.new_zeros(weight.shape[0], taps, weight.shape[1])
        stuff[:, taps // 2] = weight
        return stuff

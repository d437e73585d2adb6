"""The semantic decode heads K-Net wraps (mmseg's FCN, PSPNet, DeepLabV3/ASPP and UPerNet feature paths).

Each head maps the backbone's four levels to one feature map ``feats`` (B, channels, h, w): the map
right before mmseg's dropout + ``conv_seg`` classifier. K-Net takes its per-class kernels from that
classifier and refines them with the kernel update stages (spec section 3, "Semantic segmentation").
Every ConvModule is conv (no bias) + BatchNorm + ReLU, as in mmseg; under DDP on GPUs wrap the model
with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` to get the reference's SyncBN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int, *, dilation: int = 1
) -> nn.Sequential:
    """mmseg ConvModule with a norm: same-size padding, conv without bias, BN, ReLU.

    Initialised as mmcv's ``ConvModule.init_weights`` does (nothing in mmseg re-initialises these heads):
    the conv weight kaiming-normal with mode 'fan_out' and the ReLU gain, i.e. std sqrt(2 / (out * k * k));
    BN weight 1, bias 0. PyTorch's default (kaiming-uniform, a = sqrt(5), fan_in) starts 0.14-0.41x as wide.
    """
    padding = 0 if kernel_size == 1 else dilation * (kernel_size // 2)
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def _resize(x: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class FCNHead(nn.Module):
    """``num_convs`` 3x3 ConvModules on one level; ``concat_input`` adds conv_cat(cat(x, convs(x)))."""

    def __init__(
        self,
        *,
        in_channels: int,
        channels: int,
        in_index: int = 3,
        num_convs: int = 2,
        concat_input: bool = True,
    ) -> None:
        super().__init__()
        if num_convs < 1:
            raise ValueError(f"FCNHead needs num_convs >= 1, got {num_convs}")
        self.in_index = in_index
        widths = [in_channels] + [channels] * num_convs
        self.convs = nn.Sequential(*(conv_bn_relu(a, b, 3) for a, b in zip(widths[:-1], widths[1:])))
        self.conv_cat = conv_bn_relu(in_channels + channels, channels, 3) if concat_input else None

    def forward(self, features: list[Tensor]) -> Tensor:
        x = features[self.in_index]
        feats = self.convs(x)
        if self.conv_cat is not None:
            feats = self.conv_cat(torch.cat([x, feats], dim=1))
        return feats


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: per scale s, AdaptiveAvgPool(s) + 1x1 ConvModule, upsampled back."""

    def __init__(self, *, in_channels: int, channels: int, pool_scales: tuple[int, ...]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), conv_bn_relu(in_channels, channels, 1))
            for scale in pool_scales
        )

    def forward(self, x: Tensor) -> list[Tensor]:
        return [_resize(branch(x), x.shape[-2:]) for branch in self.branches]


class PSPHead(nn.Module):
    """bottleneck(cat(x, pyramid pooling(x))) on the last level, pool scales (1, 2, 3, 6)."""

    def __init__(
        self, *, in_channels: int, channels: int, pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    ) -> None:
        super().__init__()
        self.pyramid = PyramidPooling(in_channels=in_channels, channels=channels, pool_scales=pool_scales)
        self.bottleneck = conv_bn_relu(in_channels + len(pool_scales) * channels, channels, 3)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = features[-1]
        return self.bottleneck(torch.cat([x, *self.pyramid(x)], dim=1))


class ASPPHead(nn.Module):
    """DeepLabV3: image pooling + parallel (1x1, then 3x3 dilated 12/24/36) ConvModules, bottleneck."""

    def __init__(
        self, *, in_channels: int, channels: int, dilations: tuple[int, ...] = (1, 12, 24, 36)
    ) -> None:
        super().__init__()
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(in_channels, channels, 1))
        self.branches = nn.ModuleList(
            conv_bn_relu(in_channels, channels, 1 if d == 1 else 3, dilation=d) for d in dilations
        )
        self.bottleneck = conv_bn_relu((len(dilations) + 1) * channels, channels, 3)

    def forward(self, features: list[Tensor]) -> Tensor:
        x = features[-1]
        pooled = _resize(self.image_pool(x), x.shape[-2:])
        return self.bottleneck(torch.cat([pooled, *(branch(x) for branch in self.branches)], dim=1))


class UPerHead(nn.Module):
    """UPerNet: pyramid pooling on the last level, an FPN over all four (1x1 laterals, top-down bilinear
    sums, 3x3 outputs), every level upsampled to stride 4 and fused by a 3x3 ConvModule."""

    def __init__(
        self, *, in_channels: list[int], channels: int, pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    ) -> None:
        super().__init__()
        self.pyramid = PyramidPooling(in_channels=in_channels[-1], channels=channels, pool_scales=pool_scales)
        self.psp_bottleneck = conv_bn_relu(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = conv_bn_relu(len(in_channels) * channels, channels, 3)

    def forward(self, features: list[Tensor]) -> Tensor:
        top = features[-1]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features[:-1])]
        laterals.append(self.psp_bottleneck(torch.cat([top, *self.pyramid(top)], dim=1)))
        for level in range(len(laterals) - 1, 0, -1):
            laterals[level - 1] = laterals[level - 1] + _resize(
                laterals[level], laterals[level - 1].shape[-2:]
            )
        outputs = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outputs[0].shape[-2:]
        return self.fpn_bottleneck(torch.cat([outputs[0], *(_resize(o, size) for o in outputs[1:])], dim=1))


def build_decode_head(kind: str, *, in_channels: list[int], channels: int) -> nn.Module:
    """The named head ("fcn" | "psp" | "aspp" | "uper") over backbone levels of ``in_channels``."""
    if kind == "fcn":
        return FCNHead(in_channels=in_channels[-1], channels=channels)
    if kind == "psp":
        return PSPHead(in_channels=in_channels[-1], channels=channels)
    if kind == "aspp":
        return ASPPHead(in_channels=in_channels[-1], channels=channels)
    if kind == "uper":
        return UPerHead(in_channels=list(in_channels), channels=channels)
    raise ValueError(f"decode_head must be one of 'fcn', 'psp', 'aspp', 'uper', got {kind!r}")

"""The localization FPN (upstream SemanticFPNWrapper): fuses P2..P5 into one stride-8 map (spec section 1).

P2 goes down once with a stride-2 conv, P3 stays, P4 goes up x2, P5 (plus a 2-D sine positional
encoding) goes up x4; the four stride-8 maps are summed and read by two 1x1 heads: the localization
map (for the kernels) and the auxiliary map (for the dense semantic logits).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GN_GROUPS = 32


def conv_gn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """Conv (no bias, a norm follows) + GroupNorm(32) + ReLU."""
    return nn.Sequential(
        nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False
        ),
        nn.GroupNorm(GN_GROUPS, out_channels),
        nn.ReLU(inplace=True),
    )


def sine_positional_encoding(
    batch: int, height: int, width: int, num_feats: int, device: torch.device, temperature: float = 10000.0
) -> Tensor:
    """DETR-style normalised 2-D sine encoding over an all-valid mask -> (B, 2 * num_feats, H, W).

    Channels [0, num_feats) encode y, [num_feats, 2 num_feats) encode x; sin and cos interleave.
    """
    scale, eps = 2 * math.pi, 1e-6
    y_embed = torch.arange(1, height + 1, device=device, dtype=torch.float32)[:, None].expand(height, width)
    x_embed = torch.arange(1, width + 1, device=device, dtype=torch.float32)[None, :].expand(height, width)
    y_embed = y_embed / (height + eps) * scale
    x_embed = x_embed / (width + eps) * scale
    dim_t = torch.arange(num_feats, device=device, dtype=torch.float32)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos_x = x_embed[..., None] / dim_t  # (H, W, F)
    pos_y = y_embed[..., None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=-1).flatten(2)  # (H, W, F)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=-1).flatten(2)
    pos = torch.cat((pos_y, pos_x), dim=-1).permute(2, 0, 1)  # (H, W, 2F) -> (2F, H, W)
    return pos[None].expand(batch, -1, -1, -1)


class LocalizationFPN(nn.Module):
    """forward([P2, P3, P4, P5]) -> (loc_features, aux_features), both (B, C, H/8, W/8)."""

    def __init__(self, *, channels: int) -> None:
        super().__init__()
        self.channels = channels
        up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.level_convs = nn.ModuleList(
            [
                conv_gn_relu(channels, channels, 3, stride=2),  # P2: stride 4 -> 8
                conv_gn_relu(channels, channels, 3),  # P3
                nn.Sequential(conv_gn_relu(channels, channels, 3), up, conv_gn_relu(channels, channels, 3)),
                nn.Sequential(
                    conv_gn_relu(channels, channels, 3),
                    up,
                    conv_gn_relu(channels, channels, 3),
                    up,
                    conv_gn_relu(channels, channels, 3),
                ),
            ]
        )
        self.conv_pred = conv_gn_relu(channels, channels, 1)
        self.aux_conv = conv_gn_relu(channels, channels, 1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)

    def forward(self, features: list[Tensor]) -> tuple[Tensor, Tensor]:
        p5 = features[3]
        batch, _, height, width = p5.shape
        p5 = p5 + sine_positional_encoding(batch, height, width, self.channels // 2, p5.device).to(p5.dtype)
        inputs = [*features[:3], p5]
        target_size = features[1].shape[-2:]
        fused = None
        for conv, level in zip(self.level_convs, inputs, strict=True):
            out = conv(level)
            if out.shape[-2:] != target_size:  # odd sizes: the x2 path may be off by one pixel
                out = F.interpolate(out, size=target_size, mode="bilinear", align_corners=False)
            fused = out if fused is None else fused + out
        return self.conv_pred(fused), self.aux_conv(fused)

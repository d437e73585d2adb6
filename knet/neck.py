"""mmdet-style FPN: P2..P5 at strides 4, 8, 16, 32, all with the same width (spec section 1)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class FPN(nn.Module):
    """1x1 lateral convs (bias), top-down nearest upsample + add, 3x3 output convs (bias), no norm.

    forward([(B, C_i, h_i, w_i)] x 4) -> [(B, out_channels, h_i, w_i)] x 4. No extra levels
    (num_outs equals the number of inputs in the reference).
    """

    def __init__(self, *, in_channels: list[int], out_channels: int) -> None:
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_channels)
        self.output_convs = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels
        )
        for conv in [*self.lateral_convs, *self.output_convs]:
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features, strict=True)]
        for level in range(len(laterals) - 1, 0, -1):
            coarser = F.interpolate(laterals[level], size=laterals[level - 1].shape[-2:], mode="nearest")
            laterals[level - 1] = laterals[level - 1] + coarser
        return [conv(lateral) for conv, lateral in zip(self.output_convs, laterals, strict=True)]

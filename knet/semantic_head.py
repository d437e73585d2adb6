"""The semantic variant's kernel-generating head: a decode head's classifier weights become K-Net's
per-class kernels (spec section 3, mmseg's IterativeDecodeHead).

The decode head gives ``feats``; the initial logits are conv_seg(dropout(feats)); the initial kernels
are conv_seg's weights (one kernel per class, fixed identity, no matching) without its bias. The update
stages read the pre-dropout ``feats``. The auxiliary FCN head on the third level (C4) only trains.
"""

from __future__ import annotations

from torch import Tensor, nn

from knet.decode_heads import FCNHead, build_decode_head
from knet.structures import KernelHeadOutput

AUX_LEVEL = 2  # C4 (stride 16, or 8 for a dilated backbone)
AUX_CHANNELS = 256
DROPOUT = 0.1


def classifier(channels: int, num_classes: int) -> nn.Conv2d:
    """mmseg's conv_seg: 1x1 conv with bias, weights N(0, 0.01), bias 0."""
    conv = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


class SemanticKernelHead(nn.Module):
    """forward(backbone levels [C2..C5]) -> KernelHeadOutput.

    features: decode feats (B, C, h, w); kernels: (B, K, C) for conv_kernel_size 1, (B, K, k*k, C) with the
    classifier weight at the centre tap otherwise; mask_logits: initial class logits (B, K, h, w);
    seg_logits: the auxiliary head's logits (B, K, h', w') in train mode with ``aux_head``, else None.
    """

    def __init__(
        self,
        *,
        decode_head: str,
        in_channels: list[int],
        channels: int,
        num_classes: int,
        conv_kernel_size: int,
        aux_head: bool,
    ) -> None:
        super().__init__()
        self.conv_kernel_size = conv_kernel_size
        self.decode_head = build_decode_head(decode_head, in_channels=in_channels, channels=channels)
        self.dropout = nn.Dropout2d(DROPOUT)
        self.conv_seg = classifier(channels, num_classes)
        self.aux_head: nn.Module | None = None
        if aux_head:
            self.aux_head = nn.Sequential(
                FCNHead(
                    in_channels=in_channels[AUX_LEVEL],
                    channels=AUX_CHANNELS,
                    in_index=AUX_LEVEL,
                    num_convs=1,
                    concat_input=False,
                ),
                nn.Dropout2d(DROPOUT),
                classifier(AUX_CHANNELS, num_classes),
            )

    def forward(self, levels: list[Tensor]) -> KernelHeadOutput:
        feats = self.decode_head(levels)
        logits = self.conv_seg(self.dropout(feats))
        aux_logits = self.aux_head(levels) if self.aux_head is not None and self.training else None
        kernels = self._kernels()
        return KernelHeadOutput(
            features=feats,
            kernels=kernels[None].expand(feats.shape[0], *kernels.shape),
            mask_logits=logits,
            seg_logits=aux_logits,
        )

    def _kernels(self) -> Tensor:
        """conv_seg weight (K, C, 1, 1) -> (K, C), or (K, k*k, C) with the weight at the centre tap."""
        weight = self.conv_seg.weight[:, :, 0, 0]
        taps = self.conv_kernel_size**2
        if taps == 1:
            return weight
        kernels = weight.new_zeros(weight.shape[0], taps, weight.shape[1])
        kernels[:, taps // 2] = weight
        return kernels

"""The image backbone: a timm feature pyramid (strides 4, 8, 16, 32), always returned NCHW.

ResNets (resnet18/50/101...) and Swin transformers are supported. Frozen stages and ``norm_eval``
follow the paper's detection recipe (spec section 1 + corrections): the stem and the first stage are
frozen, BatchNorm running statistics stay frozen in train mode while the affine parameters train.
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path

import timm
from torch import Tensor, nn

from knet.backbone_weights import load_backbone_weights
from knet.errors import KnetInputError, KnetInputNotFoundError

_LOG = logging.getLogger(__name__)


def _check_name(name: str) -> None:
    known = timm.list_models()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=5)
        hint = f"; close timm names: {', '.join(close)}" if close else ""
        raise KnetInputError(f"backbone.name {name!r} is not a timm model{hint}")


class TimmBackbone(nn.Module):
    """Four feature levels from a timm model.

    forward(images (B, 3, H, W)) -> [ (B, C_i, H/s_i, W/s_i) for s_i in 4, 8, 16, 32 ]
    (with ``output_stride`` 8 a dilated ResNet gives strides 4, 8, 8, 8).
    ``channels`` lists C_i (from timm's ``feature_info``), which sizes the FPN.
    ``pretrained_path``: timm/torchvision, mmcv or mmpretrain ResNet(V1c) weights (knet.backbone_weights);
    ``pretrained_format`` says which layout the file was recognised as (None without a file).
    """

    def __init__(
        self,
        *,
        name: str,
        pretrained_path: str | None,
        frozen_stages: int,
        norm_eval: bool,
        output_stride: int,
        drop_path_rate: float,
    ) -> None:
        super().__init__()
        _check_name(name)
        if pretrained_path is not None and not Path(pretrained_path).is_file():
            raise KnetInputNotFoundError(
                f"backbone.pretrained_path {pretrained_path!r} does not exist; give a local weights file "
                "or null for random init (nothing is downloaded)"
            )
        is_swin = name.startswith("swin")
        kwargs: dict[str, object] = {}
        if output_stride != 32:
            if is_swin:
                raise ValueError(
                    f"backbone.output_stride {output_stride} needs a ResNet; {name} supports only 32"
                )
            kwargs["output_stride"] = output_stride
        if drop_path_rate > 0:
            kwargs["drop_path_rate"] = drop_path_rate
        if is_swin:
            kwargs["strict_img_size"] = False  # any padded input size, not only the pretraining size
        weights = load_backbone_weights(name, pretrained_path) if pretrained_path is not None else None
        self.pretrained_format: str | None = weights.format if weights is not None else None
        if weights is not None:
            _LOG.info(
                "backbone.pretrained_path %s: recognised as %s weights (%d tensors)",
                pretrained_path,
                weights.format,
                len(weights.state_dict),
            )
        self.body = timm.create_model(
            name,
            features_only=True,
            out_indices=(-4, -3, -2, -1),  # the last four levels: res2..res5 / Swin stages 1..4
            pretrained=weights is not None,
            # timm maps the full model's (checked, renamed) tensors onto its feature model
            pretrained_cfg_overlay=dict(state_dict=weights.state_dict) if weights is not None else None,
            **kwargs,
        )
        self.channels: list[int] = list(self.body.feature_info.channels())
        self.channels_last = str(getattr(self.body, "output_fmt", "NCHW")).endswith("NHWC")
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        for module in self._frozen_modules():
            for parameter in module.parameters():
                parameter.requires_grad_(False)
        self.train()

    def _frozen_modules(self) -> list[nn.Module]:
        """Looked up on every call, not stored: ``SyncBatchNorm.convert_sync_batchnorm`` swaps the norm
        modules after construction, and stored references would keep pointing at the old ones."""
        return self._stages()[: self.frozen_stages + 1] if self.frozen_stages >= 0 else []

    def _stages(self) -> list[nn.Module]:
        """[stem, stage1, ..., stage4]: the stem is every child before the first feature stage."""
        stage_names = [n.replace(".", "_") for n in self.body.feature_info.module_name()]
        children = dict(self.body.named_children())
        first = list(children).index(stage_names[0])
        stem = nn.ModuleList(list(children.values())[:first])
        return [stem, *(children[n] for n in stage_names)]

    def train(self, mode: bool = True) -> TimmBackbone:
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
            if self.norm_eval:
                for module in self.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self

    def forward(self, images: Tensor) -> list[Tensor]:
        features = self.body(images)
        if self.channels_last:
            features = [f.permute(0, 3, 1, 2).contiguous() for f in features]  # (B, h, w, C) -> (B, C, h, w)
        return features


def count_trainable(module: nn.Module) -> int:
    """Parameters that receive gradients (frozen stages excluded)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

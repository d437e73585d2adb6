"""K-Net (Zhang et al., NeurIPS 2021) in plain PyTorch: one kernel-update head for panoptic,
instance and semantic segmentation."""

from __future__ import annotations

from knet.build import build_model
from knet.config import (
    BackboneConfig,
    InferenceConfig,
    KernelUpdateConfig,
    KNetConfig,
    LossConfig,
    MatcherConfig,
)

__all__ = [
    "BackboneConfig",
    "InferenceConfig",
    "KNetConfig",
    "KernelUpdateConfig",
    "LossConfig",
    "MatcherConfig",
    "build_model",
]

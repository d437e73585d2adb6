"""K-Net (Zhang et al., NeurIPS 2021) in plain PyTorch: one kernel-update head for panoptic,
instance and semantic segmentation.

Beyond the model: ``knet.data`` (datasets, transforms), ``knet.evaluation`` (evaluators and the
``evaluate`` loop), ``knet.bundle`` (saved models), ``knet.visualize`` (``render_overlay``; imported
from there, so ``import knet`` does not load the drawing libraries), ``knet.typed_config`` (the strict
config loader).
"""

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

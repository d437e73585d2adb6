"""K-Net (Zhang et al., NeurIPS 2021) in plain PyTorch: one kernel-update head for panoptic,
instance and semantic segmentation.

Beyond the model: ``knet.data`` (datasets, transforms), ``knet.evaluation`` (evaluators and the
``evaluate`` loop), ``knet.bundle`` (saved models), ``knet.visualize`` (``render_overlay``; imported
from there, so ``import knet`` does not load the drawing libraries), ``knet.typed_config`` (the strict
config loader).
Importing ``knet`` or ``knet.config`` does not import torch, so a bad config is reported at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from knet.build import build_model


def __getattr__(name: str) -> Any:
    """``build_model`` is imported on first use: reading and validating a config needs no torch."""
    if name == "build_model":
        from knet.build import build_model

        return build_model
    raise AttributeError(f"module 'knet' has no attribute {name!r}")

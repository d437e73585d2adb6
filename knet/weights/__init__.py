"""Start from the published K-Net weights: map a released checkpoint onto our model.

``load_official(path, format="official-knet", task="panoptic")`` reads the official K-Net's COCO
panoptic / instance checkpoints (ZwwWayne/K-Net, mmdet 2.x) and ``format="mmseg-knet"`` with
``task="semantic"`` mmsegmentation's ADE20K K-Net (UPerNet, FCN, PSPNet, DeepLabV3 heads). It returns
our ``KNetConfig`` (read from the tensors' shapes) and the state dict in our names, or raises
``WeightsImportError`` naming every key that does not fit. ``knet.data.known_categories`` has the
class names those models were trained with.
"""

from __future__ import annotations

from knet.weights.importer import (
    load_official,
    model_shapes,
    read_state_dict,
    reference_key_map,
    to_reference,
)
from knet.weights.infer import WeightsImportError, config_from_reference
from knet.weights.names import FORMATS, Format

__all__ = [
    "FORMATS",
    "Format",
    "WeightsImportError",
    "config_from_reference",
    "load_official",
    "model_shapes",
    "read_state_dict",
    "reference_key_map",
    "to_reference",
]

"""ImageNet backbone weights in the layouts the reference configs start from, renamed to timm's names.

A file is recognised by its keys (after an optional ``{'state_dict': ...}`` wrapper and, for mm*
checkpoints, keeping only the ``backbone.`` keys without that prefix):

- ``timm/torchvision``: timm's own names. torchvision's ResNets (``torchvision://resnet50``, the
  official K-Net panoptic/instance configs) use the same names (conv1, bn1, layerN.i.convK/bnK,
  downsample.0/1), so the two cannot be told apart and need none.
- ``mmcv ResNetV1c``: mmcv/mmseg's deep stem as one Sequential ``stem.0/1/3/4/6/7`` (conv, BN, ReLU x 3),
  as in ``open-mmlab://resnet50_v1c`` (mmseg's K-Net configs) and mmseg's own checkpoints.
- ``mmpretrain ResNetV1c``: mmcls/mmpretrain's deep stem of three ConvModules ``stem.{0,1,2}.{conv,bn}``.
- ``mmpretrain ResNet``: mmcls/mmpretrain's 7x7 ResNet, timm's names under ``backbone.``.

Every tensor of the timm model must be present with its shape, or the file is refused naming the
missing keys (the BN ``num_batches_tracked`` counters, absent from old torchvision files, excepted).
ImageNet classifier tensors (``fc.``, ``head.``) are dropped; any other extra tensor is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import Tensor

from knet.errors import KnetInputError
from knet.safe_load import load_tensors

CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.")
_FIX = "save the backbone's state_dict alone (torch.save(model.state_dict(), path)) or as .safetensors"

# Deep-stem renames to timm's resnet*c names: conv1.{0,1,3,4,6} = conv, BN, conv, BN, conv; bn1 = last BN.
_MMCV_STEM = {"stem.0.": "conv1.0.", "stem.1.": "conv1.1.", "stem.3.": "conv1.3.", "stem.4.": "conv1.4."}
_MMCV_STEM |= {"stem.6.": "conv1.6.", "stem.7.": "bn1."}
_MMPRETRAIN_STEM = {"stem.0.conv.": "conv1.0.", "stem.0.bn.": "conv1.1.", "stem.1.conv.": "conv1.3."}
_MMPRETRAIN_STEM |= {"stem.1.bn.": "conv1.4.", "stem.2.conv.": "conv1.6.", "stem.2.bn.": "bn1."}


@dataclass(frozen=True)
class BackboneWeights:
    """Tensors under timm's names, and the layout the file was recognised as (for the log line)."""

    state_dict: dict[str, Tensor]
    format: str


def _renamer(table: dict[str, str]) -> Callable[[str], str]:
    def rename(key: str) -> str:
        for old, new in table.items():
            if key.startswith(old):
                return new + key[len(old) :]
        return key

    return rename


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The file's tensors: ``.safetensors`` through safetensors, anything else through the safe torch
    loader; a ``state_dict`` (mm* checkpoints, timm train checkpoints) or ``model`` wrapper is opened."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    data = load_tensors(path, fix=_FIX)
    for wrapper in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(wrapper), dict):
            data = data[wrapper]
            break
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise KnetInputError(
            f"backbone.pretrained_path {str(path)!r} holds no state dict (a mapping of names to tensors); {_FIX}"
        )
    return data


def to_timm_names(state: dict[str, Tensor], expected: dict[str, torch.Size], path: str) -> BackboneWeights:
    """Recognise the layout of ``state`` against ``expected`` (the timm model's names and shapes) and
    rename it; refuse, naming the missing, extra or mis-shaped keys, when no layout fits."""
    prefixed = any(key.startswith("backbone.") for key in state)
    if prefixed:  # an mm* checkpoint: its backbone only (neck, heads and classifier dropped)
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    layouts = {
        "mmpretrain ResNet" if prefixed else "timm/torchvision": _renamer({}),
        "mmcv ResNetV1c": _renamer(_MMCV_STEM),
        "mmpretrain ResNetV1c": _renamer(_MMPRETRAIN_STEM),
    }
    candidates = []
    for name, rename in layouts.items():
        renamed = {rename(k): v for k, v in state.items() if not k.startswith(CLASSIFIER_PREFIXES)}
        missing = [k for k in expected if k not in renamed and not k.endswith("num_batches_tracked")]
        candidates.append((len(missing), name, renamed, missing))
    _, name, renamed, missing = min(candidates, key=lambda c: c[0])
    extra = [k for k in renamed if k not in expected]
    wrong = [f"{k} {tuple(v.shape)} (the model's is {tuple(expected[k])})" for k, v in renamed.items()
             if k in expected and v.shape != expected[k]]  # fmt: skip
    problems = [
        f"{what}: {', '.join(keys[:8])}{f' and {len(keys) - 8} more' if len(keys) > 8 else ''}"
        for keys, what in (
            (missing, f"{len(missing)} tensor(s) of the model are missing"),
            (extra, f"{len(extra)} tensor(s) are not in the model"),
            (wrong, f"{len(wrong)} tensor(s) have another shape"),
        )
        if keys
    ]
    if problems:
        raise KnetInputError(
            f"backbone.pretrained_path {path!r} is not a recognised weights file for this backbone "
            f"(closest layout: {name}): {'; '.join(problems)}. Known layouts: timm/torchvision, "
            "mmcv ResNetV1c (open-mmlab://resnet50_v1c), mmpretrain ResNet/ResNetV1c"
        )
    return BackboneWeights(state_dict=renamed, format=name)


def timm_shapes(name: str) -> dict[str, torch.Size]:
    """Names and shapes of timm's full ``name`` model (classifier excluded), built on the meta device so
    no memory is allocated and nothing is initialised."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    return {k: v.shape for k, v in model.state_dict().items() if not k.startswith(CLASSIFIER_PREFIXES)}


def load_backbone_weights(name: str, path: str | Path) -> BackboneWeights:
    """The file at ``path`` as timm's ``name`` model's state dict, with the layout it was recognised as."""
    return to_timm_names(read_state_dict(path), timm_shapes(name), str(path))

"""Read a released K-Net checkpoint and map every tensor onto our model, or refuse naming the keys.

Nothing is skipped or guessed: a checkpoint key no rule maps onto the model (unmapped), a model tensor
no checkpoint key gives (missing) and a tensor of another shape are all reported together, in one
error, by their reference names.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from knet.build import build_model
from knet.config import KNetConfig, Task
from knet.safe_load import load_tensors
from knet.weights.infer import WeightsImportError, config_from_reference
from knet.weights.names import FORMATS, Format, KeyMap, key_map

SHOWN = 5  # names listed per kind of problem; the count says how many more there are
_SAFE_FIX = (
    "re-save only its tensors on a machine you trust: torch.save(torch.load(path, weights_only=False)"
    "['state_dict'], 'weights.pth')"
)


def read_state_dict(checkpoint: str | Path | Mapping[str, object]) -> dict[str, Tensor]:
    """The tensors of a released checkpoint: a file or a loaded mapping, either ``{'meta': ...,
    'state_dict': {...}}`` (how mmdet/mmseg save them) or a bare state dict."""
    where = "the checkpoint"
    if isinstance(checkpoint, (str, Path)):
        where = str(checkpoint)
        if not Path(checkpoint).is_file():
            raise WeightsImportError(f"checkpoint {checkpoint} does not exist")
        checkpoint = load_tensors(checkpoint, fix=_SAFE_FIX)
    if not isinstance(checkpoint, Mapping):
        raise WeightsImportError(f"{where} holds a {type(checkpoint).__name__}, not a state dict")
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise WeightsImportError(f"{where}: 'state_dict' is a {type(state).__name__}, not a mapping")
    not_tensors = [str(key) for key, value in state.items() if not isinstance(value, Tensor)]
    if not_tensors:
        raise WeightsImportError(f"{where} is not a state dict: {_names(not_tensors)} are not tensors")
    return dict(state)


def reference_key_map(format: Format, config: KNetConfig) -> KeyMap:
    """The key map between ``format``'s names and a model built from ``config``."""
    if format not in FORMATS:
        raise WeightsImportError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    deep_stem = config.backbone.name.endswith(("c", "d"))
    return key_map(
        format, deep_stem=deep_stem, decode_head=config.decode_head if format == "mmseg-knet" else None
    )


def load_official(
    checkpoint: str | Path | Mapping[str, object],
    *,
    format: Format,
    task: Task,
    num_thing_classes: int | None = None,
) -> tuple[KNetConfig, dict[str, Tensor]]:
    """A released K-Net checkpoint as (our model config, state dict in our names).

    ``format``: "official-knet" (ZwwWayne/K-Net, panoptic/instance) or "mmseg-knet" (mmsegmentation,
    semantic). The config comes from the tensors' shapes (knet.weights.infer). Use it as
    ``model = build_model(config); model.load_state_dict(state)``. Raises WeightsImportError naming
    every unmapped, missing or mis-shaped key.
    """
    if format not in FORMATS:
        raise WeightsImportError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    reference = read_state_dict(checkpoint)
    config = config_from_reference(reference, format, task, num_thing_classes=num_thing_classes)
    expected = model_shapes(config)
    names = reference_key_map(format, config)
    state: dict[str, Tensor] = {}
    unmapped, mismatched = [], []
    for key, tensor in reference.items():
        ours = names.to_ours(key)
        if ours is None or ours not in expected:
            unmapped.append(key)
        elif tuple(tensor.shape) != expected[ours]:
            mismatched.append(f"{key} {list(tensor.shape)} (the model needs {list(expected[ours])})")
        else:
            state[ours] = tensor
    missing = [names.to_reference(key) or key for key in expected if key not in state]
    missing = [key for key in missing if key not in reference]  # a mis-shaped key is reported once
    _refuse_if_any(format, task, unmapped=unmapped, missing=missing, mismatched=mismatched)
    return config, state


def model_shapes(config: KNetConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of the model ``config`` builds, with its shape (built on the meta device:
    no memory, no compute)."""
    with torch.device("meta"):
        model = build_model(config)
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def to_reference(state: Mapping[str, Tensor], config: KNetConfig, format: Format) -> dict[str, Tensor]:
    """Our state dict under ``format``'s names, as a released checkpoint holds it (the inverse of
    ``load_official``); a key with no reference name raises WeightsImportError."""
    names = reference_key_map(format, config)
    renamed = {key: names.to_reference(key) for key in state}
    unnamed = [key for key, name in renamed.items() if name is None]
    if unnamed:
        raise WeightsImportError(f"no {format} name for {len(unnamed)} keys: {_names(unnamed)}")
    return {renamed[key]: value for key, value in state.items()}


def _refuse_if_any(format: str, task: str, **problems: list[str]) -> None:
    found = [f"{len(keys)} {kind}: {_names(keys)}" for kind, keys in problems.items() if keys]
    if not found:
        return
    hint = ""
    if any("conv_offset" in key for key in problems["unmapped"]):
        hint = " (deformable convolutions, as in the R-101-DCN models, are not supported)"
    raise WeightsImportError(
        f"the checkpoint does not map onto K-Net ({format}, task {task}); " + "; ".join(found) + hint
    )


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN])
    return shown if len(keys) <= SHOWN else f"{shown} and {len(keys) - SHOWN} more"

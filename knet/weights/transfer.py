"""Fine-tune from a model trained on other classes: load every tensor that fits, start the
class-specific layers afresh, refuse a model of another shape naming the keys.

Only a few layers depend on the classes (``knet.build``): the stages' classifiers ``fc_cls``
(panoptic / instance), the kernel head's ``conv_seg`` (the dense thing classifier, whose stuff rows are
panoptic's stuff kernels; semantic's class kernels) and the semantic auxiliary head's classifier.
Everything else (backbone, neck, kernel head, stages) must have the same names and shapes: a different
backbone, number of stages, width or number of proposals is refused, not half-loaded.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from knet.build import build_model
from knet.bundle import CONFIG_FILE, INFERENCE_FILE, WEIGHTS_FILE
from knet.config import KNetConfig
from knet.data.categories import CategoryTable
from knet.errors import KnetInputError, KnetInputNotFoundError
from knet.safe_load import load_tensors
from knet.semantic_head import SemanticKernelHead

SHOWN = 5  # keys named per kind of problem; the count says how many more there are
_UNCOMPARED = ("num_thing_classes", "num_stuff_classes", "loss", "matcher", "inference")


class TransferError(KnetInputError):
    """The source weights do not fit the model outside its class-specific layers."""


@dataclass(frozen=True)
class ReinitialisedGroup:
    """One class-specific layer family started afresh: ``stages.*.fc_cls`` and its state-dict keys."""

    name: str
    role: str
    keys: tuple[str, ...]
    source_classes: int
    target_classes: int

    def line(self) -> str:
        counts = f"{self.source_classes} -> {self.target_classes} classes"
        if self.source_classes == self.target_classes:
            counts += ", other names"
        return f"re-initialised {self.name} ({self.role}: {counts})"


@dataclass(frozen=True)
class TransferReport:
    """What :func:`transfer_weights` did: the keys loaded from the source, the groups started afresh."""

    loaded: tuple[str, ...]
    reinitialised: tuple[ReinitialisedGroup, ...]

    def lines(self) -> list[str]:
        """One line per re-initialised group, then the count of loaded tensors."""
        return [group.line() for group in self.reinitialised] + [f"loaded {len(self.loaded)} tensors"]


def class_specific_layers(model: nn.Module) -> dict[str, tuple[str, list[str]]]:
    """Group name -> (role, module names) of the layers whose shape follows the class counts."""
    semantic = isinstance(model.kernel_head, SemanticKernelHead)
    if semantic:
        role = "class kernels"
    elif model.kernel_head.num_stuff_classes > 0:  # panoptic: its stuff rows are the stuff kernels
        role = "dense classifier and stuff kernels"
    else:
        role = "dense thing classifier"
    groups = {"kernel_head.conv_seg": (role, ["kernel_head.conv_seg"])}
    if semantic and model.kernel_head.aux_head is not None:
        last = len(model.kernel_head.aux_head) - 1
        groups[f"kernel_head.aux_head.{last}"] = ("auxiliary classifier", [f"kernel_head.aux_head.{last}"])
    fcs = [f"stages.{i}.fc_cls" for i, stage in enumerate(model.stages) if stage.fc_cls is not None]
    if fcs:
        groups["stages.*.fc_cls"] = ("class FCs", fcs)
    return groups


def plan_transfer(
    model: nn.Module, source_shapes: Mapping[str, tuple[int, ...]], *, classes_match: bool
) -> TransferReport:
    """Which source keys load into ``model`` and which class-specific groups start afresh; raises
    TransferError naming every key outside those groups that is missing, extra or of another shape."""
    target_shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    groups = {
        name: (role, [key for key in target_shapes if key.startswith(tuple(f"{m}." for m in modules))])
        for name, (role, modules) in class_specific_layers(model).items()
    }
    class_keys = {key for _, keys in groups.values() for key in keys}
    missing = [key for key in target_shapes if key not in source_shapes]
    extra = [key for key in source_shapes if key not in target_shapes]
    mismatched = [
        f"{key} {list(source_shapes[key])} (the model needs {list(shape)})"
        for key, shape in target_shapes.items()
        if key in source_shapes and key not in class_keys and tuple(source_shapes[key]) != shape
    ]
    problems = {"missing": missing, "extra": extra, "of another shape": mismatched}
    found = [f"{len(keys)} {kind}: {_names(keys)}" for kind, keys in problems.items() if keys]
    if found:
        raise TransferError("the weights do not fit the model; " + "; ".join(found))
    reinitialised = []
    for name, (role, keys) in groups.items():
        fits = all(tuple(source_shapes[key]) == target_shapes[key] for key in keys)
        if not (fits and classes_match):
            source, target = (source_shapes[keys[0]][0], target_shapes[keys[0]][0])
            reinitialised.append(ReinitialisedGroup(name, role, tuple(keys), source, target))
    fresh = {key for group in reinitialised for key in group.keys}
    return TransferReport(tuple(k for k in target_shapes if k not in fresh), tuple(reinitialised))


def transfer_weights(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, classes_match: bool = True
) -> TransferReport:
    """Load ``state_dict`` into ``model`` except its class-specific layers when the classes differ,
    which keep the model's own fresh initialisation (a new classifier starts at the prior, as in
    training from scratch). ``classes_match``: the source was trained on the model's classes (same
    names, same order); False starts those layers afresh even where their shapes fit."""
    shapes = {key: tuple(value.shape) for key, value in state_dict.items()}
    report = plan_transfer(model, shapes, classes_match=classes_match)
    merged = model.state_dict()
    for key in report.loaded:
        merged[key] = state_dict[key]
    model.load_state_dict(merged)
    return report


def check_transferable(source: KNetConfig, target: KNetConfig) -> None:
    """Refuse, before any weights are read, a source model whose layers outside the class-specific ones
    do not fit ``target`` (both built on the meta device: no memory, no compute)."""
    if (source.task == "semantic") != (target.task == "semantic"):
        raise TransferError(
            f"a {source.task} model cannot start a {target.task} one (semantic K-Net has a decode head "
            "where the others have an FPN); panoptic and instance models start each other"
        )
    with torch.device("meta"):
        source_model = build_model(_without_pretrained(source))
        target_model = build_model(_without_pretrained(target))
    shapes = {key: tuple(value.shape) for key, value in source_model.state_dict().items()}
    try:
        plan_transfer(target_model, shapes, classes_match=False)
    except TransferError as error:
        differences = config_differences(source, target)
        hint = f" (the source model has {differences}: set these model keys)" if differences else ""
        raise TransferError(f"{error}{hint}") from None


def config_differences(source: KNetConfig, target: KNetConfig) -> str:
    """The model fields (dotted, class counts and loss/inference settings aside) whose values differ."""
    ours, theirs = _flat(target.to_dict()), _flat(source.to_dict())
    differing = [
        f"{key}={theirs.get(key)!r} (here {ours.get(key)!r})"
        for key in sorted(set(ours) | set(theirs))
        if ours.get(key) != theirs.get(key) and not key.startswith(_UNCOMPARED)
    ]
    return _names(differing)


def transfer_from_bundle(
    model: nn.Module, bundle_dir: str | Path, categories: CategoryTable
) -> TransferReport:
    """Start ``model`` (built for ``categories``) from a ``knet.bundle`` folder's weights; its classes
    match when its category names and thing/stuff split are the same, in the same order."""
    bundle_dir = _require_bundle(bundle_dir)
    inference = json.loads((bundle_dir / INFERENCE_FILE).read_text())
    source = CategoryTable.from_dict(inference["categories"])
    same = source.names == categories.names and source.num_thing_classes == categories.num_thing_classes
    state = load_tensors(bundle_dir / WEIGHTS_FILE, fix="write the bundle with knet.bundle.save_bundle.")
    return transfer_weights(model, state, classes_match=same)


def bundle_config(bundle_dir: str | Path) -> KNetConfig:
    """The model config a ``knet.bundle`` folder was saved with (no weights read)."""
    return KNetConfig.from_dict(json.loads((_require_bundle(bundle_dir) / CONFIG_FILE).read_text()))


def _require_bundle(bundle_dir: str | Path) -> Path:
    bundle_dir = Path(bundle_dir)
    for name in (WEIGHTS_FILE, CONFIG_FILE, INFERENCE_FILE):
        if not (bundle_dir / name).is_file():
            raise KnetInputNotFoundError(f"{bundle_dir} is not a model bundle: {name} is missing")
    return bundle_dir


def _without_pretrained(config: KNetConfig) -> KNetConfig:
    return dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, pretrained_path=None))


def _flat(section: Mapping[str, object], prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in section.items():
        if isinstance(value, Mapping):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN])
    return shown if len(keys) <= SHOWN else f"{shown} and {len(keys) - SHOWN} more"

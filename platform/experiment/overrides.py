"""Dotted overrides (``--set model.num_proposals=50``, Tune's sampled values) on a raw experiment dict."""

from __future__ import annotations

import copy
import difflib
from typing import Any

import yaml
from knet_platform.experiment.building import ExperimentError
from knet_platform.experiment.yaml_loader import load_yaml


def parse_override(text: str) -> tuple[str, Any]:
    """``"train.lr=2e-4"`` -> ``("train.lr", 0.0002)``; the value is parsed as YAML (``null``, lists...)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ExperimentError(f"bad override {text!r}: write key=value with a dotted key, e.g. train.lr=2e-4")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ExperimentError(f"bad override {text!r}: the value is not valid YAML ({error})") from None
    return key, value


def apply_overrides(
    raw: dict[str, Any], overrides: dict[str, Any], *, model_keys: set[str]
) -> dict[str, Any]:
    """A deep copy of ``raw`` with each dotted key set. ``model.*`` keys must name a KNetConfig field
    (``model_keys``, e.g. ``model.update.num_heads``); other keys are checked when the experiment is built."""
    result = copy.deepcopy(raw)
    for key, value in overrides.items():
        if key.startswith("model.") and key not in model_keys:
            close = difflib.get_close_matches(key, sorted(model_keys), n=1)
            hint = f"did you mean '{close[0]}'?" if close else "see `knet show-config` for the model keys"
            raise ExperimentError(f"unknown key '{key}': {hint}")
        node = result
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ExperimentError(f"cannot set '{key}': '{where}' is {child!r}, not a section")
            node = child
        node[parts[-1]] = value
    return result

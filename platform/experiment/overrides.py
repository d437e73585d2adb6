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
        mark = getattr(error, "problem_mark", None)
        where = f" at column {mark.column + 1}" if mark is not None and mark.line == 0 else ""
        raise ExperimentError(
            f"bad override {text!r}: the value is not valid YAML{where} ({yaml_error_cause(error)}); "
            f"quote it (--set '{key}=\"...\"') or fix the syntax, e.g. --set train.lr=2e-4"
        ) from None
    return key, value


def yaml_error_cause(error: yaml.YAMLError) -> str:
    """PyYAML's cause on one line (``mapping values are not allowed here``, with the construct it was
    reading, ``while scanning a quoted scalar``), without its multi-line position excerpt."""
    problem = getattr(error, "problem", None)
    context = getattr(error, "context", None)
    if not problem:  # a ReaderError (a control character) has no problem/mark, only its text
        return " ".join(str(error).split()) or type(error).__name__
    if not context:
        return str(problem)
    problem_mark, context_mark = error.problem_mark, getattr(error, "context_mark", None)
    if context_mark is not None and (problem_mark is None or context_mark.line != problem_mark.line):
        context = f"{context} started at line {context_mark.line + 1}"
    return f"{problem} ({context})"


def yaml_error_location(error: yaml.YAMLError) -> tuple[int, int] | None:
    """The 1-based line and column PyYAML points at, or None when it gives no position."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    return None if mark is None else (mark.line + 1, mark.column + 1)


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

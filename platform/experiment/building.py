"""Strict building of typed dataclasses from YAML mappings, for the experiment file's sections.

``build`` walks a dataclass's type hints: an unknown key is refused with a did-you-mean and its dotted
path, a value of the wrong type names its key and the expected type, a missing required field names
what to add. A type with its own ``from_dict`` (knet's ``DataSource`` and ``TransformConfig``, the
search entries) parses its mapping itself (a ``YAML_FORM`` class attribute, if any, tells the user the
shape expected); its ``ValueError``/``TypeError`` comes back prefixed with the key.
``plain`` is the inverse: YAML-safe dicts and lists, through each type's ``to_dict`` where it has one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

from knet_platform.errors import KnetUserError


class ExperimentError(KnetUserError, ValueError):
    """A bad experiment file or override; the message names the key and the fix."""


def require(condition: bool, key: str, fix: str) -> None:
    if not condition:
        raise ExperimentError(f"{key}: {fix}")


def build(cls: type, data: Any, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from ``data`` with key and type checks; ``prefix`` is the dotted
    path of ``cls``'s section with a trailing dot ("" for the whole file, where a null is refused)."""
    where = prefix.rstrip(".") or "the experiment"
    if isinstance(data, cls):
        return data
    if data is None and prefix:
        data = {}  # an empty section (`train:`) takes the defaults
    if not isinstance(data, dict):
        raise ExperimentError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"known keys: {', '.join(names)}"
            raise ExperimentError(f"unknown key '{prefix}{key}': {hint}")
        kwargs[key] = conform(value, hints[key], f"{prefix}{key}")
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs and _required(f)]
    if missing:
        raise ExperimentError(f"{prefix}{missing[0]} is missing: add it to the YAML")
    try:
        return cls(**kwargs)
    except ExperimentError:
        raise
    except (ValueError, TypeError) as error:
        raise ExperimentError(f"{where}: {error}") from None


def conform(value: Any, tp: Any, key: str) -> Any:
    """``value`` checked against type ``tp`` (ints accepted for floats); raises naming ``key``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return conform(value, option, key)
            except ExperimentError as error:
                errors.append(error)
        if len(options) == 1:
            raise errors[0]
        raise ExperimentError(f"{key}: expected {_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ExperimentError(f"{key}: {value!r} is not allowed; use one of {', '.join(map(repr, args))}")
        return value
    if tp is Any:
        return value
    if isinstance(tp, type) and hasattr(tp, "from_dict"):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            form = getattr(tp, "YAML_FORM", tp.__name__)
            raise ExperimentError(f"{key}: expected a mapping ({form}), got {value!r}")
        try:
            return tp.from_dict(value)
        except (ValueError, TypeError) as error:
            raise ExperimentError(f"{key}: {error}") from None
    if dataclasses.is_dataclass(tp):
        return build(tp, value, f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ExperimentError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ExperimentError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ExperimentError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ExperimentError(f"{key}: expected a string, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ExperimentError(f"{key}: expected a list, got {value!r}")
        return [conform(item, args[0], f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ExperimentError(f"{key}: expected a mapping, got {value!r}")
        return {conform(k, args[0], key): conform(v, args[1], f"{key}.{k}") for k, v in value.items()}
    raise TypeError(f"experiment schema: no rule for type {tp!r} at {key}")  # a bug here, not in the YAML


def plain(value: Any) -> Any:
    """YAML-safe dicts, lists and scalars; ``build(type(x), plain(x), ...)`` gives ``x`` back."""
    if hasattr(value, "to_dict") and not isinstance(value, type):
        return plain(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain_fields(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def plain_fields(instance: Any) -> dict[str, Any]:
    """A dataclass instance's fields as ``plain`` values (for a ``to_dict`` of its own)."""
    return {f.name: plain(getattr(instance, f.name)) for f in dataclasses.fields(instance)}


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")

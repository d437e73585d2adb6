"""Strict typed dataclass configs: build them from YAML/JSON mappings, check them, turn them back.

One loader for every config in the project (the model's ``KNetConfig``, the data's ``DataSource`` and
``TransformConfig``, the platform's experiment sections), so a typo or a wrong type fails the same way
everywhere, with the dotted key and the fix, instead of silently becoming a default:

- ``build(cls, data, prefix)``: a dataclass from a mapping. An unknown key is refused with a
  did-you-mean, a value of the wrong type names its key and the expected type, a missing required
  field names what to add. Nested dataclasses are built from nested mappings; a type with its own
  ``from_dict`` parses its mapping itself (a ``YAML_FORM`` class attribute, if any, describes the
  shape it expects) and its ValueError/TypeError comes back under its key.
- ``check_field_types(instance, section)``: the same type rules on a dataclass built directly (call it
  from ``__post_init__``); nested configs must be instances there, not mappings.
- ``plain(value)``: the inverse, YAML-safe dicts, lists and scalars.

Type rules: an int field takes an int (not a bool, not 2.0); a float field an int or a float (not a
bool; stored as a float); a bool field a bool; a str field a str; ``X | None`` also None; a Literal one
of its values (of the same type); ``list[X]`` / ``tuple[X, ...]`` / ``tuple[X, Y]`` a list or tuple
whose items fit (stored as the annotated container); ``dict[K, V]`` a mapping; ``Any`` anything.
Every failure is one ``ConfigFieldError``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from knet.errors import KnetInputError

ErrorKind = Literal["unknown", "type", "missing", "invalid"]


class ConfigFieldError(KnetInputError):
    """One bad config value.

    key: its full dotted path (``train.lr_steps``, ``update.dropout``, ``sizes[1]``; "" for the whole
    config), so a caller holding the config under a section of its own can prefix it.
    problem: the rest of the message, a predicate that reads after the key (``must be a float, got
    None``, ``is unknown; did you mean 'train.lr_steps'?``).
    kind: "unknown" (a key the dataclass has no field for), "type" (a value of the wrong type),
    "missing" (a required field not given) or "invalid" (a type's own ``from_dict`` refused the value).
    hint: for an unknown key, the suggestion alone (``did you mean 'train.lr_steps'?`` or
    ``known keys: a, b``); None otherwise.
    label: what the config is called in the message (``model config``, ``DataSource``).

    The message is ``<label> key '<key>' <problem>`` (``<label> <problem>`` for the whole config).
    """

    def __init__(
        self,
        key: str,
        problem: str,
        *,
        kind: ErrorKind = "type",
        hint: str | None = None,
        label: str = "config",
    ) -> None:
        super().__init__(f"{label} key '{key}' {problem}" if key else f"{label} {problem}")
        self.key = key
        self.problem = problem
        self.kind = kind
        self.hint = hint
        self.label = label

    def under(self, key: str, label: str) -> ConfigFieldError:
        """The same error with its key prefixed by ``key`` (the section it was found in)."""
        return ConfigFieldError(
            _join(key, self.key), self.problem, kind=self.kind, hint=self.hint, label=label
        )


def build(cls: type, data: Any, prefix: str = "", *, label: str = "config") -> Any:
    """Dataclass ``cls`` from the mapping ``data``, every key and value checked.

    prefix: the dotted path of ``cls``'s section ("" for a whole config; a trailing dot is allowed),
    which every error key starts with. An instance of ``cls`` is returned as is; None inside a
    section (``train:`` with nothing under it) takes the defaults. Errors the constructor itself
    raises (range checks in ``__post_init__``) pass through unchanged.
    """
    section = prefix.rstrip(".")
    if isinstance(data, cls):
        return data
    if data is None and section:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigFieldError(section, f"must be a mapping (a config section), got {data!r}", label=label)
    hints = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in hints:
            hint = _suggest(str(key), list(hints), section)
            raise ConfigFieldError(
                _join(section, str(key)), f"is unknown; {hint}", kind="unknown", hint=hint, label=label
            )
        kwargs[key] = conform(value, hints[key], _join(section, key), label=label)
    for f in dataclasses.fields(cls):
        if f.init and f.name not in kwargs and _required(f):
            raise ConfigFieldError(_join(section, f.name), "is required: add it", kind="missing", label=label)
    return cls(**kwargs)


def conform(value: Any, annotation: Any, key: str, *, label: str = "config") -> Any:
    """``value`` checked against ``annotation`` and stored as it says (an int in a float field becomes
    a float, a list in a tuple field a tuple, a mapping in a dataclass field that dataclass); else
    ConfigFieldError naming ``key``."""
    return _conform(value, annotation, key, label, construct=True)


def check_field_types(instance: Any, section: str, *, label: str = "config") -> None:
    """Check every field of the dataclass ``instance`` against its annotation, in place (an int in a
    float field is stored as a float, a sequence takes the annotated container). Nested configs must
    already be instances. ``section`` prefixes the keys in errors ("" for the top level)."""
    for name, annotation in _field_types(type(instance)).items():
        value = getattr(instance, name)
        conformed = _conform(value, annotation, _join(section, name), label, construct=False)
        if conformed is not value:
            setattr(instance, name, conformed)


def plain(value: Any) -> Any:
    """YAML-safe dicts, lists and scalars; ``build(type(x), plain(x))`` gives ``x`` back. Goes through
    a value's own ``to_dict`` where it has one."""
    if hasattr(value, "to_dict") and not isinstance(value, type):
        return plain(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain_fields(value)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def plain_fields(instance: Any) -> dict[str, Any]:
    """A dataclass instance's fields as ``plain`` values (what a ``to_dict`` of its own returns)."""
    return {f.name: plain(getattr(instance, f.name)) for f in dataclasses.fields(instance)}


_TYPE_NAMES: dict[Any, tuple[str, str]] = {  # annotation -> (one value, several values)
    bool: ("a bool (true or false)", "bools"),
    int: ("an integer", "integers"),
    float: ("a float", "floats"),
    str: ("a string", "strings"),
    type(None): ("None", "None"),
}


def describe(annotation: Any, plural: bool = False, *, construct: bool = True) -> str:
    """What a value of ``annotation`` must be, in words: ``an integer or None``, ``a list of floats``.
    ``construct``: whether a mapping is accepted for a nested config (``build``) or only an instance
    (``check_field_types``)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation in _TYPE_NAMES:
        return _TYPE_NAMES[annotation][plural]
    if annotation is Any:
        return "anything"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(option, plural, construct=construct) for option in args)
    if origin is Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is list or (origin is tuple and args[1:] == (Ellipsis,)):
        return f"a list of {describe(args[0], plural=True, construct=construct)}"
    if origin is tuple:
        items = ", ".join(describe(arg, construct=construct) for arg in args)
        return f"a list of {len(args)} items ({items})"
    if annotation is dict or origin is dict:
        return "mappings" if plural else "a mapping"
    name = getattr(annotation, "__name__", str(annotation))
    if construct and _parses_itself(annotation):
        return f"a mapping ({getattr(annotation, 'YAML_FORM', name)})"
    if construct and dataclasses.is_dataclass(annotation):
        return "mappings (config sections)" if plural else "a mapping (a config section)"
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return f"{name} values" if plural else f"{article} {name}"


def _conform(value: Any, annotation: Any, key: str, label: str, *, construct: bool) -> Any:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _conform_union(value, annotation, key, label, construct=construct)
    if origin is Literal:
        if any(type(value) is type(option) and value == option for option in args):
            return value
    elif _parses_itself(annotation) and construct:
        if isinstance(value, annotation):
            return value
        if isinstance(value, Mapping):
            return _parse(annotation, value, key, label)
    elif dataclasses.is_dataclass(annotation) and construct:
        if isinstance(value, annotation):
            return value
        if isinstance(value, Mapping) or value is None:
            return build(annotation, value, key, label=label)
    elif origin in (list, tuple):
        if isinstance(value, (list, tuple)):
            variadic = origin is list or args[1:] == (Ellipsis,)
            item_types = (args[0],) * len(value) if variadic else args
            if len(item_types) == len(value):
                pairs = enumerate(zip(value, item_types, strict=True))
                return origin(
                    _conform(item, tp, f"{key}[{i}]", label, construct=construct) for i, (item, tp) in pairs
                )
    elif annotation is dict or origin is dict:
        if isinstance(value, Mapping):
            if not args:
                return dict(value)
            return {
                _conform(k, args[0], key, label, construct=construct): _conform(
                    v, args[1], _join(key, str(k)), label, construct=construct
                )
                for k, v in value.items()
            }
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(annotation, type):  # bool, str, None; configs given as instances
        if isinstance(value, annotation):
            return value
    else:
        raise TypeError(f"knet.typed_config: no type rule for {annotation!r} ({key})")  # a bug, not the data
    raise ConfigFieldError(
        key, f"must be {describe(annotation, construct=construct)}, got {value!r}", label=label
    )


def _conform_union(value: Any, annotation: Any, key: str, label: str, *, construct: bool) -> Any:
    """The first option ``value`` fits. When an option failed deeper inside the value (an item of a
    list, a key of a section) or its own parser refused it, that error is the useful one."""
    args = typing.get_args(annotation)
    if value is None and type(None) in args:
        return None
    for option in args:
        try:
            return _conform(value, option, key, label, construct=construct)
        except ConfigFieldError as error:
            if error.key != key or error.kind != "type":
                raise
    raise ConfigFieldError(
        key, f"must be {describe(annotation, construct=construct)}, got {value!r}", label=label
    )


def _parse(config_type: type, value: Mapping, key: str, label: str) -> Any:
    """A type with its own ``from_dict``: its errors come back under ``key``."""
    try:
        return config_type.from_dict(dict(value))
    except ConfigFieldError as error:
        raise error.under(key, label) from None
    except (ValueError, TypeError) as error:
        raise ConfigFieldError(key, str(error), kind="invalid", label=label) from None


def _parses_itself(annotation: Any) -> bool:
    return isinstance(annotation, type) and callable(getattr(annotation, "from_dict", None))


@functools.cache
def _field_types(config_type: type) -> dict[str, Any]:
    """A dataclass's resolved field annotations (modules with postponed annotations store strings)."""
    hints = typing.get_type_hints(config_type)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_type) if f.init}


def _suggest(key: str, known: list[str], section: str) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return f"did you mean '{_join(section, close[0])}'?"
    return f"known keys: {', '.join(known)}"


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _join(section: str, key: str) -> str:
    return f"{section}.{key}" if section and key else section or key

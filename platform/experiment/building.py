"""Strict building of the experiment file's sections, on ``knet``'s one typed-config loader.

``knet.typed_config`` (reached through the adapter) refuses unknown keys with a did-you-mean, wrong
types and missing fields, naming the dotted key; here its errors become the platform's one
:class:`ExperimentError` in the experiment file's words (``unknown key 'train.lr_step': did you mean
'train.lr_steps'?``, ``train.epochs: must be an integer, got 'x'``).
"""

from __future__ import annotations

from typing import Any

from knet_platform.errors import KnetUserError
from knet_platform.knet_adapter import ConfigFieldError, build_config, plain, plain_fields

__all__ = ["ExperimentError", "build", "plain", "plain_fields", "require"]


class ExperimentError(KnetUserError, ValueError):
    """A bad experiment file or override; the message names the key and the fix."""


def require(condition: bool, key: str, fix: str) -> None:
    if not condition:
        raise ExperimentError(f"{key}: {fix}")


def build(cls: type, data: Any, prefix: str) -> Any:
    """Dataclass ``cls`` from the mapping ``data``; ``prefix`` is the dotted path of its section ("" for
    the whole file, where a null is refused). Range checks in ``__post_init__`` raise ExperimentError."""
    try:
        return build_config(cls, data, prefix)
    except ConfigFieldError as error:
        raise ExperimentError(_message(error, prefix)) from None
    except ExperimentError:
        raise
    except (ValueError, TypeError) as error:  # a constructor's own check, e.g. knet's DataSource
        raise ExperimentError(f"{prefix.rstrip('.') or 'the experiment'}: {error}") from None


def _message(error: ConfigFieldError, prefix: str) -> str:
    key = error.key or prefix.rstrip(".") or "the experiment"
    if error.kind == "unknown":
        return f"unknown key '{key}': {error.hint}"
    if error.kind == "missing":
        return f"{key} is missing: add it to the YAML"
    return f"{key}: {error.problem}"

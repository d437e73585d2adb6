"""One redaction rule for everything that leaves the process for MLflow, checkpoints or the terminal.

Three kinds of secret are masked with ``***``:

- the value of a secret-looking key (``password``, ``token``, ``secret``, ``api_key``,
  ``access_key``, ``credential``, ``signature``, ...), whatever its type;
- the user-info part of a URI (``https://alice:hunter2@host`` -> ``https://***@host``);
- secret-looking query parameters of a URI (``?token=abc``, ``&X-Amz-Signature=...``, ``&sig=...``).

A masked value is never needed to resume a run: resuming reads the experiment from the YAML (and
``--set``) again, and the local run record compares tracking URIs in their masked form.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

_SECRET_WORDS = re.compile(
    r"password|passwd|passphrase|secret|token|credential|signature|api_?key|access_?key|private_?key|"
    r"session_?key|auth_?key"
)
_SECRET_NAMES = frozenset({"pwd", "pass", "sig", "key", "auth", "authorization", "apikey"})
# scheme://userinfo@host: the user-info runs to the last "@" before the path, query or fragment
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s@]*(?:@[^/?#\s@]*)*@")
# ?name=value or &name=value (or ;name=value); the value runs to the next separator
_QUERY_PARAM = re.compile(r"(?P<sep>[?&;])(?P<name>[^=&;#\s?]+)=(?P<value>[^&;#\s]*)")


def is_secret_key(name: str) -> bool:
    """Whether a key (a YAML key, an override's last part, a query parameter) names a secret."""
    lowered = str(name).strip().lower().replace("-", "_")
    return lowered in _SECRET_NAMES or _SECRET_WORDS.search(lowered) is not None


def redact_text(text: str) -> str:
    """``text`` with URI user-info and secret-looking query parameters masked."""
    if "@" not in text and "=" not in text:
        return text
    masked = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)

    def query(match: re.Match[str]) -> str:
        if is_secret_key(match["name"]) and match["value"]:
            return f"{match['sep']}{match['name']}={MASK}"
        return match.group(0)

    return _QUERY_PARAM.sub(query, masked)


def redact(value: Any) -> Any:
    """A copy of ``value`` (dicts, lists, tuples, strings, numbers) with every secret masked: the whole
    value of a secret-looking key (unless it is empty), and URI secrets inside any string."""
    if isinstance(value, dict):
        return {
            key: MASK if is_secret_key(key) and item not in (None, "") else redact(item)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(redact(item) for item in value)
    if isinstance(value, str):
        return redact_text(value)
    return value

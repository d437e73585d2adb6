"""Reading experiment YAML: PyYAML's safe loader, with numbers read as YAML 1.2 reads them.

PyYAML implements YAML 1.1, where ``1e-4`` (no dot) is a string, not a float; every K-Net learning
rate and loss weight is written that way. :class:`ExperimentLoader` is ``yaml.SafeLoader`` (plain data
only, never arbitrary Python objects) with the YAML 1.2 float rule added.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class ExperimentLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads ``1e-4``, ``5E+3`` and ``.5e2`` as floats."""


ExperimentLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text to plain Python data (dicts, lists, str, int, float, bool, None)."""
    return yaml.load(text, Loader=ExperimentLoader)  # a SafeLoader subclass: plain data only

"""Reading torch files safely: ``torch.load(weights_only=True)``, and a refusal that says why.

torch's own error for a file holding pickled Python objects advises ``weights_only=False``, which
would run that code; here such a file is refused naming the file and the object it holds.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from knet.errors import KnetInputError


class UnsafeWeightsError(KnetInputError):
    """A torch file holds pickled Python objects, not only tensors and plain values."""


def load_tensors(path: str | Path, *, fix: str, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``; a file holding pickled objects raises
    UnsafeWeightsError naming ``path``, the object, and ``fix`` (how to get a safe file)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        held = f": {found.group(1)}" if found else ""
        raise UnsafeWeightsError(
            f"{path} is not a safe state dict (it holds pickled Python objects{held}) and was refused; {fix}"
        ) from None

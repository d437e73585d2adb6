"""The one error type of ``knet.data``: bad input, always naming the file at fault."""

from __future__ import annotations

from knet.errors import KnetInputError


class DataError(KnetInputError):
    """A dataset file is missing, corrupt or inconsistent; the message names the file."""

"""The base of every error knet raises for input its caller can fix: a missing or malformed dataset,
results or bundle file, a bad config value, an argument out of range. The message names the file or key
at fault and the fix.

Anything else knet raises (a plain ``ValueError``, ``KeyError``, ...) is a bug in knet, so a program on
top of knet, like the ``knet`` command, can tell its user's mistakes from its own. Each class is also
the built-in exception it used to be (``ValueError``; ``FileNotFoundError`` too for a missing file), so
``except ValueError`` keeps working.
"""

from __future__ import annotations


class KnetInputError(ValueError):
    """Bad input to knet (a file, a config value, an argument); the message names it and the fix."""


class KnetInputNotFoundError(KnetInputError, FileNotFoundError):
    """A file or folder knet was pointed at does not exist, or is not what it should be."""

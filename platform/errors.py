"""The one base class of the errors a user fixes: a bad experiment, an unreachable tracking store, a
cluster too small for the request, a broken installation.

``knet`` prints such an error as one ``error: <message>`` line and exits with code 2 (``--debug`` shows
the traceback), so every message names the cause and the fix. Each subclass also derives from the
built-in exception it used to be (ValueError, RuntimeError), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class KnetUserError(Exception):
    """A problem in the user's configuration or environment, with the fix in its message."""


class RunFailedError(RuntimeError):
    """A run or search that started and failed in a way its message explains (every trial failed, no
    checkpoint reported a finite metric); the details are above it in the log and in MLflow. ``knet``
    prints it as one ``error:`` line and exits with code 1."""


# knet's base class of the errors its caller can fix, recognised by name: only the adapter imports knet
KNET_INPUT_ERROR = "knet.errors.KnetInputError"


def is_knet_input_error(error: BaseException) -> bool:
    """Whether ``error`` is a ``knet.errors.KnetInputError`` (a bad file, config value or argument)."""
    return any(f"{cls.__module__}.{cls.__qualname__}" == KNET_INPUT_ERROR for cls in type(error).__mro__)


def is_deterministic(error: BaseException) -> bool:
    """Whether ``error`` recurs when the same input is tried again: a user error (ours or knet's: a bad
    data file, config value, model), or an error class that says so (``deterministic = True``: a loss
    that became NaN from the same weights and batch). Such a failure is not worth a restart."""
    return (
        isinstance(error, KnetUserError)
        or is_knet_input_error(error)
        or bool(getattr(type(error), "deterministic", False))
    )

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

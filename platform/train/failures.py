"""What a failed Train run says: the worker's error or Ray's memory kill, as one line, and whether a
restart of the worker group could help."""

from __future__ import annotations

import os
import re

from knet_platform.errors import is_deterministic
from knet_platform.ray_runtime import DEFAULT_WORKER_GROUP_START_TIMEOUT_S, WORKER_GROUP_START_TIMEOUT_ENV
from ray.exceptions import OutOfMemoryError, RayTaskError
from ray.train import TrainingFailedError

# What Ray's memory monitor writes into the error of a process it killed (Ray 2.60)
_OOM_MARK = "running low on memory"
_OOM_FIGURE = re.compile(r"was ([\d.]+\s*[KMGT]?B) used / ([\d.]+\s*[KMGT]?B) limit")
_OOM_THRESHOLD = re.compile(r"threshold of \d+B \(([\d.]+)% of")
_OOM_VICTIM = re.compile(r"task name=([^,]+),")

MEMORY_ADVICE = (
    "lower scaling.num_workers, train.batch_size or data.num_workers, or run on a node with more memory "
    "(README: 'When Ray runs out of memory')"
)


def worker_causes(error: TrainingFailedError) -> list[BaseException]:
    """The exceptions the workers raised (unwrapped from Ray's task errors), by rank."""
    failures = getattr(error, "worker_failures", None) or {}
    return [getattr(failure, "cause", None) or failure for _, failure in sorted(failures.items())]


def worth_a_restart(error: TrainingFailedError) -> bool:
    """False for failures that repeat on a restart: a user error or a non-finite loss in a worker,
    a process Ray's memory monitor killed (the same workers need the same memory again), or a worker
    group the cluster could not place in time (a lost node comes back only when someone adds one)."""
    causes = worker_causes(error)
    return not (
        any(is_deterministic(cause) for cause in causes)
        or any(is_memory_kill(cause) for cause in [error, *causes])
        or is_capacity_timeout(error)
    )


def is_capacity_timeout(error: BaseException) -> bool:
    """Ray Train gave up starting the worker group: the cluster no longer has room for it (a node was
    lost). Only raised when ``scaling.wait_for_resources`` is off; otherwise Train waits."""
    controller = getattr(error, "controller_failure", None)
    return type(controller).__name__ == "WorkerGroupStartupTimeoutError"


def capacity_message(error: BaseException) -> str | None:
    """One line for :func:`is_capacity_timeout`, else None."""
    if not is_capacity_timeout(error):
        return None
    timeout = os.environ.get(WORKER_GROUP_START_TIMEOUT_ENV, DEFAULT_WORKER_GROUP_START_TIMEOUT_S)
    return (
        f"the cluster could not place the worker group within {timeout} s: it has fewer nodes or "
        "resources than scaling asks for (was a node lost?). Once it has them again, `knet run --resume` "
        "continues from the last checkpoint; set scaling.wait_for_resources: true to wait instead"
    )


def is_memory_kill(error: BaseException) -> bool:
    return isinstance(error, OutOfMemoryError) or _OOM_MARK in str(error)


def memory_kill_message(error: BaseException) -> str | None:
    """``Ray's memory monitor killed <what> (node memory 3.6GB used / 23.5GB limit, kill threshold
    95%): <advice>``, or None when ``error`` is no memory kill."""
    killed = next((e for e in [error, *_causes(error)] if is_memory_kill(e)), None)
    if killed is None:
        return None
    text = str(killed)
    victim = _OOM_VICTIM.search(text)
    figure = _OOM_FIGURE.search(text)
    threshold = _OOM_THRESHOLD.search(text)
    what = f"the process running {victim.group(1).strip()}" if victim else "a training process"
    details = []
    if figure:
        details.append(f"node memory {figure.group(1)} used / {figure.group(2)} limit")
    if threshold:
        details.append(f"kill threshold {float(threshold.group(1)):g}%")
    shown = f" ({', '.join(details)})" if details else ""
    return f"Ray's memory monitor killed {what}{shown}: {MEMORY_ADVICE}"


def describe_failure(error: TrainingFailedError) -> str:
    """The first failed worker's error as one line: ``worker 0: NonFiniteLossError: non-finite ...``;
    a failure of Ray Train's controller as its last line."""
    failures = getattr(error, "worker_failures", None) or {}
    for rank, failure in sorted(failures.items()):
        cause = _innermost(failure)
        lines = [line for line in str(cause).strip().splitlines() if line.strip()]
        if isinstance(cause, RayTaskError):  # a traceback whose last line names the error
            line = lines[-1] if lines else ""
        else:  # the error's own message; Ray Data appends its retry advice on further lines
            line = lines[0] if lines else ""
        name = type(cause).__name__
        return f"worker {rank}: {line if line.startswith(name) else f'{name}: {line}'}"
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _innermost(failure: BaseException) -> BaseException:
    """The error under Ray's task-error wrappers (a Ray Data read inside a worker wraps twice)."""
    seen = set()
    while getattr(failure, "cause", None) is not None and id(failure) not in seen:
        seen.add(id(failure))
        failure = failure.cause
    return failure


def _causes(error: BaseException) -> list[BaseException]:
    if isinstance(error, TrainingFailedError):
        controller = getattr(error, "controller_failure", None)
        return [*worker_causes(error), *([controller] if controller is not None else [])]
    return []

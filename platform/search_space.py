"""The ``tune`` section turned into what Ray Tune runs: search domains and a resource budget.

Both are pure functions of the validated experiment (no Ray started), so a search that cannot run is
refused before anything expensive happens: a trial that does not fit the cluster would otherwise wait
for resources forever (Ray 2.60 retries scheduling without failing).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ray import tune

OPERATORS = ("choice", "grid", "uniform", "loguniform", "randint", "qrandint")


class SearchSpaceError(ValueError):
    """A ``tune.space`` entry that Tune cannot sample; the message names the key and the fix."""


def to_domain(key: str, op: str, args: Sequence[Any]) -> Any:
    """One ``tune.space`` entry (``{op: args}`` in YAML) as a Ray Tune domain.

    choice / grid: a non-empty list of values. uniform / loguniform: [low, high] (loguniform needs
    low > 0). randint: [low, high) integers. qrandint: [low, high, q] integers on a grid of q (high
    inclusive, as Tune's qrandint).
    """
    args = list(args)
    where = f"tune.space.{key}"
    if op in ("choice", "grid"):
        if not args:
            raise SearchSpaceError(f"{where}: {op} needs a non-empty list of values, e.g. {{{op}: [1, 2]}}")
        return tune.choice(args) if op == "choice" else tune.grid_search(args)
    if op in ("uniform", "loguniform"):
        low, high = _bounds(where, op, args, 2, float)
        if op == "loguniform" and low <= 0:
            raise SearchSpaceError(f"{where}: loguniform needs low > 0 (got low={low}); use uniform for 0")
        return tune.uniform(low, high) if op == "uniform" else tune.loguniform(low, high)
    if op == "randint":
        low, high = _bounds(where, op, args, 2, int)
        return tune.randint(low, high)
    if op == "qrandint":
        low, high, q = _bounds(where, op, args, 3, int)
        if q < 1 or (high - low) % q != 0:
            raise SearchSpaceError(
                f"{where}: qrandint [low, high, q] needs q >= 1 dividing high - low (got {args})"
            )
        return tune.qrandint(low, high, q)
    raise SearchSpaceError(f"{where}: unknown operator {op!r}; use one of {', '.join(OPERATORS)}")


def param_space(space: Mapping[str, tuple[str, Sequence[Any]]]) -> dict[str, Any]:
    """``{dotted key: (op, args)}`` -> Tune's ``param_space`` (flat, keyed by the dotted key)."""
    return {key: to_domain(key, op, args) for key, (op, args) in space.items()}


def corner_values(op: str, args: Sequence[Any]) -> list[Any]:
    """Values a trial may receive for this entry that are worth validating up front: every listed
    value, or both ends of a range."""
    if op in ("choice", "grid"):
        return list(args)
    if op == "randint":
        return [args[0], args[1] - 1]
    return [args[0], args[1]]


def num_trials(space: Mapping[str, tuple[str, Sequence[Any]]], num_samples: int) -> int:
    """Trials Tune will create: ``num_samples`` times the product of every grid's length."""
    grid_points = math.prod(len(args) for op, args in space.values() if op == "grid")
    return num_samples * grid_points


@dataclass(frozen=True)
class TrialBudget:
    """Resources one trial holds (its driver function + its Train workers) and how many run at once."""

    driver: dict[str, float]
    per_trial: dict[str, float]
    max_concurrent: int


def plan_budget(
    cluster: Mapping[str, float],
    *,
    num_workers: int,
    resources_per_worker: Mapping[str, float],
    driver_cpus: float,
    requested_concurrency: int | None,
    total_trials: int,
) -> TrialBudget:
    """Concurrency such that ``trials x (driver + workers)`` fits ``cluster`` (``ray.cluster_resources()``).

    Raises SearchSpaceError when a single trial cannot fit: Tune would wait for it forever.
    A requested ``max_concurrent_trials`` above what fits is lowered to what fits.
    """
    per_trial: dict[str, float] = {"CPU": driver_cpus}
    for resource, amount in resources_per_worker.items():
        per_trial[resource] = per_trial.get(resource, 0.0) + amount * num_workers
    fits = math.inf
    for resource, amount in per_trial.items():
        if amount <= 0:
            continue
        available = float(cluster.get(resource, 0.0))
        fits = min(fits, math.floor(available / amount + 1e-9))
    if fits < 1:
        needs = ", ".join(f"{amount:g} {resource}" for resource, amount in per_trial.items() if amount > 0)
        has = ", ".join(f"{float(cluster.get(r, 0.0)):g} {r}" for r in per_trial)
        raise SearchSpaceError(
            f"one trial needs {needs} (its driver: {driver_cpus:g} CPU + scaling.num_workers={num_workers} "
            f"x {dict(resources_per_worker)}), but the Ray cluster has {has}; no trial could ever start. "
            "Lower scaling.num_workers or scaling.resources_per_worker, or tune.trial_driver_cpus, "
            "or use a bigger cluster."
        )
    limit = int(min(fits, max(total_trials, 1)))
    if requested_concurrency is not None:
        limit = min(limit, requested_concurrency)
    driver = {"CPU": driver_cpus} if driver_cpus > 0 else {}
    return TrialBudget(driver=driver, per_trial=per_trial, max_concurrent=max(limit, 1))


def _bounds(where: str, op: str, args: list[Any], arity: int, kind: type) -> list[Any]:
    if len(args) != arity:
        shape = "[low, high]" if arity == 2 else "[low, high, q]"
        raise SearchSpaceError(f"{where}: {op} takes {shape}, got {args}")
    values = []
    for value in args:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SearchSpaceError(f"{where}: {op} bounds must be numbers, got {value!r}")
        if kind is int and not float(value).is_integer():
            raise SearchSpaceError(f"{where}: {op} bounds must be integers, got {value!r}")
        values.append(kind(value))
    if values[0] >= values[1]:
        raise SearchSpaceError(f"{where}: {op} needs low < high, got {args[:2]}")
    return values

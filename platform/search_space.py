"""The ``tune`` section turned into what Ray Tune runs: search domains and a resource budget.

Everything here is a pure function of the experiment and the cluster's resources (no Ray started),
so a search that cannot run is refused before anything expensive happens: a trial that does not fit
the cluster would otherwise wait for resources forever (Ray 2.60 retries scheduling without failing).
Ray is imported inside the functions that build domains, so validating a YAML stays fast.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

OPERATORS = ("choice", "grid", "uniform", "loguniform", "randint", "qrandint")
CONTINUOUS = ("uniform", "loguniform")
LISTED = ("choice", "grid")
SEARCH_ALGS = ("random", "grid", "optuna")
EXHAUSTIVE_LIMIT = 64  # integer ranges with at most this many values are validated value by value
RANGE_SAMPLES = 8  # inner values checked (besides both ends) in a longer integer range
COMBINATION_LIMIT = 128  # a space with at most this many value combinations is checked whole
COMBINATION_SAMPLES = 32  # else: this many random combinations

Space = Mapping[str, tuple[str, Sequence[Any]]]


class SearchSpaceError(ValueError):
    """A ``tune.space`` entry that Tune cannot sample; the message names the key and the fix."""


def to_domain(key: str, op: str, args: Sequence[Any]) -> Any:
    """One ``tune.space`` entry (``{op: args}`` in YAML) as a Ray Tune domain.

    choice / grid: a non-empty list of values. uniform / loguniform: [low, high] (loguniform needs
    low > 0). randint: [low, high) integers. qrandint: [low, high, q] integers on a grid of q (high
    inclusive, as Tune's qrandint).
    """
    from ray import tune

    args = list(args)
    where = f"tune.space.{key}"
    if op in LISTED:
        if not args:
            raise SearchSpaceError(f"{where}: {op} needs a non-empty list of values, e.g. {{{op}: [1, 2]}}")
        return tune.choice(args) if op == "choice" else tune.grid_search(args)
    if op in CONTINUOUS:
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


def param_space(space: Space) -> dict[str, Any]:
    """``{dotted key: (op, args)}`` -> Tune's ``param_space`` (flat, keyed by the dotted key)."""
    return {key: to_domain(key, op, args) for key, (op, args) in space.items()}


def resolve_space(space: Space, search_alg: str, num_samples: int) -> dict[str, tuple[str, list[Any]]]:
    """The space Tune runs for ``search_alg``, or a SearchSpaceError for a combination that is ambiguous.

    random: Tune's variant generator; ``grid`` entries are enumerated, every other entry is sampled
    once per trial, and the grid is repeated ``num_samples`` times.
    grid: every entry is enumerated (``choice`` lists become grids); ranges are refused (list their
    values), and so is ``num_samples`` > 1 (it would train every configuration again, identically).
    optuna: Optuna samples every entry itself and cannot enumerate, so ``grid`` entries are refused.
    """
    resolved = {key: (op, list(args)) for key, (op, args) in space.items()}
    if search_alg == "grid":
        ranges = [key for key, (op, _) in resolved.items() if op not in LISTED]
        if ranges:
            key = ranges[0]
            op, args = resolved[key]
            raise SearchSpaceError(
                f"tune.space.{key}.{op}: tune.search_alg=grid runs every combination of listed values, and "
                f"a range ({op}: {args}) has no list to enumerate. Write its values as {{grid: [...]}} "
                "(or {choice: [...]}), or use search_alg: random to sample it."
            )
        if num_samples != 1:
            raise SearchSpaceError(
                f"tune.num_samples={num_samples} with tune.search_alg=grid would train every configuration "
                f"{num_samples} times with the same seed; set num_samples: 1 (or use search_alg: random)."
            )
        return {key: ("grid", args) for key, (_, args) in resolved.items()}
    if search_alg == "optuna":
        grids = [key for key, (op, _) in resolved.items() if op == "grid"]
        if grids:
            raise SearchSpaceError(
                f"tune.space.{grids[0]}.grid: tune.search_alg=optuna samples every entry itself and cannot "
                "enumerate a grid; write it as {choice: [...]} (Optuna then picks among the values), or use "
                "search_alg: grid / random."
            )
        return resolved
    if search_alg != "random":
        raise SearchSpaceError(f"tune.search_alg={search_alg!r}: use one of {', '.join(SEARCH_ALGS)}")
    return resolved


def values_to_check(op: str, args: Sequence[Any], *, seed: int = 0) -> list[Any]:
    """Values a trial may receive for this entry that are validated up front: every listed value,
    every value of an integer range of at most ``EXHAUSTIVE_LIMIT`` values (else both ends and
    ``RANGE_SAMPLES`` inner values drawn with ``seed``), both ends and the middle of a continuous range."""
    if op in LISTED:
        return list(args)
    if op in ("randint", "qrandint"):
        step = int(args[2]) if op == "qrandint" else 1
        stop = int(args[1]) + 1 if op == "qrandint" else int(args[1])  # qrandint includes high
        values = range(int(args[0]), stop, step)
        if len(values) <= EXHAUSTIVE_LIMIT:
            return list(values)
        inner = random.Random(seed).sample(range(1, len(values) - 1), RANGE_SAMPLES)
        return [values[0], *(values[i] for i in sorted(inner)), values[-1]]
    low, high = float(args[0]), float(args[1])
    middle = math.sqrt(low * high) if op == "loguniform" else (low + high) / 2
    return [low, middle, high]


def combinations_to_check(
    candidates: Mapping[str, Sequence[Any]], *, seed: int = 0
) -> Iterator[dict[str, Any]]:
    """Joint values of every entry (validated together: e.g. ``model.channels`` must be divisible by
    ``model.update.num_heads``): all combinations when there are at most ``COMBINATION_LIMIT``, else
    ``COMBINATION_SAMPLES`` random ones."""
    keys = list(candidates)
    total = math.prod(len(candidates[key]) for key in keys)
    if total <= COMBINATION_LIMIT:
        for values in itertools.product(*(candidates[key] for key in keys)):
            yield dict(zip(keys, values))
        return
    rng = random.Random(seed)
    for _ in range(COMBINATION_SAMPLES):
        yield {key: rng.choice(list(candidates[key])) for key in keys}


def check_value_type(key: str, op: str, field_type: Any) -> None:
    """Refuse a continuous range on an integer field: Tune would sample fractional values (1.37 stages)
    that fail only when a trial builds its model. ``field_type`` is the field's declared type (None
    when unknown: nothing to check)."""
    if op not in CONTINUOUS or field_type is None or not _is_int_type(field_type):
        return
    raise SearchSpaceError(
        f"tune.space.{key}.{op}: {key} is an integer, but {op} samples fractional values (e.g. 1.5); "
        "use {randint: [low, high)} or {qrandint: [low, high, q]} (or list the values with choice/grid)."
    )


def field_type(key: str) -> Any:
    """The declared type of a dotted experiment key (``model.*`` keys: the KNetConfig field), or None
    when the key does not name a typed field (an unknown key is reported elsewhere)."""
    from knet_platform.experiment import Experiment

    from knet import KNetConfig

    parts = key.split(".")
    owner: Any = Experiment
    if parts[0] == "model":
        owner, parts = KNetConfig, parts[1:]
    for index, part in enumerate(parts):
        owner = _strip_optional(owner)
        if typing.get_origin(owner) is dict and index == len(parts) - 1:
            return typing.get_args(owner)[1]
        if not (isinstance(owner, type) and dataclasses.is_dataclass(owner)):
            return None
        hints = typing.get_type_hints(owner)
        if part not in hints:
            return None
        owner = hints[part]
    return owner


def num_trials(space: Space, num_samples: int) -> int:
    """Trials Tune will create: ``num_samples`` times the product of every grid's length."""
    grid_points = math.prod(len(args) for op, args in space.values() if op == "grid")
    return num_samples * grid_points


@dataclass(frozen=True)
class TrialBudget:
    """Resources one trial holds (its driver function + its Train workers) and how many run at once."""

    driver: dict[str, float]
    worker: dict[str, float]
    per_trial: dict[str, float]
    max_concurrent: int


def worker_resources(resources_per_worker: Mapping[str, float], use_gpu: bool) -> dict[str, float]:
    """What Ray Train reserves per worker: ``resources_per_worker`` without zero amounts, plus 1 GPU when
    ``use_gpu`` and no GPU amount is given (as ``ray.train.ScalingConfig`` does in Ray 2.60)."""
    bundle = {name: float(amount) for name, amount in resources_per_worker.items() if amount != 0}
    if use_gpu:
        bundle.setdefault("GPU", 1.0)
    return bundle


def plan_budget(
    cluster: Mapping[str, float],
    *,
    num_workers: int,
    resources_per_worker: Mapping[str, float],
    driver_cpus: float,
    requested_concurrency: int | None,
    total_trials: int,
    use_gpu: bool = False,
    nodes: Sequence[Mapping[str, float]] | None = None,
) -> TrialBudget:
    """Concurrency such that ``trials x (driver + workers)`` fits ``cluster`` (``ray.cluster_resources()``)
    and its ``nodes`` (each alive node's resources from ``ray.nodes()``; default: one node holding all).

    Raises SearchSpaceError when a single trial cannot fit: Tune would wait for it forever. That is
    the case when the cluster's totals are too small, or when one worker (or the trial's driver) is
    bigger than every node (a Ray bundle never spans nodes). The concurrency is what fits when trials are
    packed node by node (first fit), never more than the totals allow; a requested
    ``max_concurrent_trials`` above it is lowered to it. Computed from the resources at this moment.
    """
    nodes = [dict(node) for node in nodes] if nodes is not None else [dict(cluster)]
    worker = worker_resources(resources_per_worker, use_gpu)
    driver = {"CPU": float(driver_cpus)} if driver_cpus > 0 else {}
    per_trial: dict[str, float] = dict(driver)
    for resource, amount in worker.items():
        per_trial[resource] = per_trial.get(resource, 0.0) + amount * num_workers
    gpu_note = (
        " (+ 1 GPU per worker for scaling.use_gpu)" if use_gpu and "GPU" not in resources_per_worker else ""
    )
    for name, bundle in (("Train worker", worker), ("trial driver", driver)):
        if bundle and not any(_fits(bundle, node) for node in nodes):
            shapes = sorted({_fmt_resources({r: node.get(r, 0.0) for r in bundle}) for node in nodes})
            largest = "; ".join(shapes[:4]) + ("; ..." if len(shapes) > 4 else "")
            raise SearchSpaceError(
                f"one {name} needs {_fmt_resources(bundle)} (scaling.resources_per_worker="
                f"{dict(resources_per_worker)}{gpu_note}, tune.trial_driver_cpus={driver_cpus:g}), but no "
                f"Ray node has that much (a worker runs on one node; the nodes have: {largest}); no trial "
                "could ever start. Lower scaling.resources_per_worker or use bigger nodes."
            )
    fits = math.inf
    for resource, amount in per_trial.items():
        if amount > 0:
            fits = min(fits, math.floor(float(cluster.get(resource, 0.0)) / amount + 1e-9))
    if fits < 1:
        has = ", ".join(f"{float(cluster.get(r, 0.0)):g} {r}" for r in per_trial)
        raise SearchSpaceError(
            f"one trial needs {_fmt_resources(per_trial)} (its driver: {driver_cpus:g} CPU + "
            f"scaling.num_workers={num_workers} x {worker}{gpu_note}), but the Ray cluster has {has}; no "
            "trial could ever start. Lower scaling.num_workers or scaling.resources_per_worker, or "
            "tune.trial_driver_cpus, or use a bigger cluster."
        )
    limit = int(min(fits, max(total_trials, 1)))
    # never below 1: the checks above found no proof that a trial cannot fit, only first fit failing
    limit = min(limit, max(_packed_trials(nodes, driver, worker, num_workers, limit=limit), 1))
    if requested_concurrency is not None:
        limit = min(limit, requested_concurrency)
    return TrialBudget(driver=driver, worker=worker, per_trial=per_trial, max_concurrent=max(limit, 1))


def _packed_trials(
    nodes: list[dict[str, float]],
    driver: dict[str, float],
    worker: dict[str, float],
    num_workers: int,
    limit: int,
) -> int:
    """How many whole trials (driver + workers) first-fit packing places on ``nodes``, up to ``limit``."""
    free = [dict(node) for node in nodes]
    placed = 0
    while placed < limit:
        trial_free = [dict(node) for node in free]
        for bundle in [driver, *([worker] * num_workers)]:
            if not bundle:
                continue
            node = next((n for n in trial_free if _fits(bundle, n)), None)
            if node is None:
                return placed
            for resource, amount in bundle.items():
                node[resource] = node.get(resource, 0.0) - amount
        free = trial_free
        placed += 1
    return placed


def _fits(bundle: Mapping[str, float], node: Mapping[str, float]) -> bool:
    return all(float(node.get(resource, 0.0)) + 1e-9 >= amount for resource, amount in bundle.items())


def _fmt_resources(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in resources.items() if amount > 0) or "nothing"


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(options) == 1:
            return options[0]
    return tp


def _is_int_type(tp: Any) -> bool:
    return _strip_optional(tp) is int


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

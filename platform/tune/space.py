"""The ``tune`` section turned into what Ray Tune runs: search domains (secrets masked) and a resource
budget.

Everything here is a pure function of the experiment and the cluster's resources (no Ray started),
so a search that cannot run is refused before anything expensive happens: a trial that does not fit
the cluster would otherwise wait for resources forever (Ray 2.60 retries scheduling without failing),
unless ``scaling.wait_for_resources`` says an autoscaler will add nodes. Ray is imported inside the
functions that build domains and budgets, so validating a YAML stays fast.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from knet_platform.errors import KnetUserError
from knet_platform.redaction import redact

OPERATORS = ("choice", "grid", "uniform", "loguniform", "randint", "qrandint")
CONTINUOUS = ("uniform", "loguniform")
LISTED = ("choice", "grid")
SEARCH_ALGS = ("random", "grid", "optuna")
EXHAUSTIVE_LIMIT = 64  # integer ranges with at most this many values are validated value by value
RANGE_SAMPLES = 8  # inner values checked (besides both ends) in a longer integer range
COMBINATION_LIMIT = 128  # a space with at most this many value combinations is checked whole
COMBINATION_SAMPLES = 32  # else: this many random combinations

Space = Mapping[str, tuple[str, Sequence[Any]]]


class SearchSpaceError(KnetUserError, ValueError):
    """A search that cannot run as configured (a ``tune.space`` entry Tune cannot sample, a bad ``tune``
    setting, a trial the cluster cannot hold); the message names the key and the fix."""


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


@dataclass(frozen=True)
class MaskedSpace:
    """The space as Tune sees it, prints (each trial's configuration, its status table) and stores:
    every listed value holding a secret (``knet_platform.redaction``) replaced by a placeholder, its
    masked form and position (``https://***@host #2``; ``*** #1`` under a secret-named key), so trials
    stay told apart. :meth:`reveal` gives a trial its real values."""

    space: dict[str, tuple[str, list[Any]]]
    originals: dict[str, dict[str, Any]]  # key -> placeholder -> the value it stands for

    def reveal(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """A trial's values as Tune gave them (placeholders) -> the values the trial trains with."""
        return {
            key: self.originals.get(key, {}).get(value, value) if isinstance(value, str) else value
            for key, value in config.items()
        }


def mask_space(space: Space) -> MaskedSpace:
    """``space`` with every secret-holding ``choice``/``grid`` value replaced by a placeholder (ranges
    hold numbers only)."""
    shown_space: dict[str, tuple[str, list[Any]]] = {}
    originals: dict[str, dict[str, Any]] = {}
    for key, (op, args) in space.items():
        shown = list(args)
        if op in LISTED:
            for index, value in enumerate(args):
                masked = redact({key: value})[key]  # a secret-named key masks its whole value
                if masked != value:
                    text = masked if isinstance(masked, str) else json.dumps(masked, default=str)
                    shown[index] = f"{text} #{index + 1}"
                    originals.setdefault(key, {})[shown[index]] = value
        shown_space[key] = (op, shown)
    return MaskedSpace(space=shown_space, originals=originals)


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
    from knet_platform.experiment.schema import Experiment

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
    """Resources one trial holds (its driver function + its Train workers), how many run at once and,
    when the search waits for an autoscaler, the line saying what is pending (else None)."""

    driver: dict[str, float]
    worker: dict[str, float]
    per_trial: dict[str, float]
    max_concurrent: int
    pending: str | None = None


def require_concurrency_when_waiting(wait_for_resources: bool, max_concurrent_trials: int | None) -> None:
    """With ``scaling.wait_for_resources`` a search waits for an autoscaler, so the cluster's size now
    cannot say how many trials to run at once: ``tune.max_concurrent_trials`` must (checked before Ray
    starts, the same on any cluster)."""
    if wait_for_resources and max_concurrent_trials is None:
        raise SearchSpaceError(
            "tune.max_concurrent_trials is null, but scaling.wait_for_resources=true lets the search wait "
            "for the cluster's autoscaler, so the cluster's size now cannot set how many trials run at "
            "once: set it (e.g. --set tune.max_concurrent_trials=2; each trial holds its driver and "
            "scaling.num_workers workers), or set scaling.wait_for_resources=false."
        )


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
    wait_for_resources: bool = False,
    local: bool = False,
) -> TrialBudget:
    """Concurrency such that ``trials x (driver + workers)`` fits ``cluster`` (``ray.cluster_resources()``)
    and its ``nodes`` (each alive node's resources from ``ray.nodes()``; default: one node holding all).

    Raises SearchSpaceError when a single trial cannot fit: Tune would wait for it forever. That is
    the case when the cluster's totals are too small, when one worker (or the trial's driver) is bigger
    than every node (a Ray bundle never spans nodes), or when the nodes cannot place ``num_workers``
    workers. The concurrency is what fits when trials are packed node by node (first fit), never more
    than the totals allow; a requested ``max_concurrent_trials`` above it is lowered to it. Computed
    from the resources at this moment.

    wait_for_resources, on a cluster that can grow (not ``local``, a Ray that ``knet`` started in this
    process): nothing is refused for size; ``requested_concurrency`` (then required) trials run at once,
    at most ``total_trials``, and ``pending`` says what waits for the autoscaler when fewer fit now.
    """
    from knet_platform.ray_runtime import bundles_on_node, packed_groups, placeable_workers, worker_resources

    require_concurrency_when_waiting(wait_for_resources, requested_concurrency)
    nodes = [dict(node) for node in nodes] if nodes is not None else [dict(cluster)]
    worker = worker_resources(resources_per_worker, use_gpu)
    driver = {"CPU": float(driver_cpus)} if driver_cpus > 0 else {}
    per_trial: dict[str, float] = dict(driver)
    for resource, amount in worker.items():
        per_trial[resource] = per_trial.get(resource, 0.0) + amount * num_workers
    gpu_note = (
        " (+ 1 GPU per worker for scaling.use_gpu)" if use_gpu and "GPU" not in resources_per_worker else ""
    )
    problem = None
    for name, bundle in (("Train worker", worker), ("trial driver", driver)):
        if problem is None and bundle and not any(bundles_on_node(bundle, node) for node in nodes):
            problem = (
                f"one {name} needs {_fmt_resources(bundle)} (scaling.resources_per_worker="
                f"{dict(resources_per_worker)}{gpu_note}, tune.trial_driver_cpus={driver_cpus:g}), but no "
                f"Ray node has that much (a worker runs on one node; the nodes have: "
                f"{_node_shapes(nodes, bundle)}); no trial could ever start. Lower "
                "scaling.resources_per_worker or use bigger nodes."
            )
    room = placeable_workers(nodes, worker)
    if problem is None and room < num_workers:
        problem = (
            f"one trial needs scaling.num_workers={num_workers} workers of {_fmt_resources(worker)}"
            f"{gpu_note}, but the Ray nodes have room for {room} (a worker runs on one node; the nodes "
            f"have: {_node_shapes(nodes, worker)}); no trial could ever start. Lower scaling.num_workers "
            "or scaling.resources_per_worker, or use bigger nodes."
        )
    by_totals = bundles_on_node(per_trial, cluster)
    if problem is None and by_totals < 1:
        has = ", ".join(f"{float(cluster.get(r, 0.0)):g} {r}" for r in per_trial)
        problem = (
            f"one trial needs {_fmt_resources(per_trial)} (its driver: {driver_cpus:g} CPU + "
            f"scaling.num_workers={num_workers} x {worker}{gpu_note}), but the Ray cluster has {has}; no "
            "trial could ever start. Lower scaling.num_workers or scaling.resources_per_worker, or "
            "tune.trial_driver_cpus, or use a bigger cluster."
        )
    trials = max(total_trials, 1)
    fits_now = 0
    if problem is None:
        fits_now = min(by_totals, trials)
        # never below 1: the checks above found no proof that a trial cannot fit, only first fit failing
        group = [driver, *([worker] * num_workers)]
        fits_now = min(fits_now, max(packed_groups(nodes, group, limit=fits_now), 1))
    if wait_for_resources and not local:
        assert requested_concurrency is not None  # require_concurrency_when_waiting
        concurrency = min(requested_concurrency, trials)
        pending = None
        if fits_now < concurrency:
            pending = (
                f"waiting for resources: each trial holds {_fmt_resources(per_trial)} (its driver and "
                f"scaling.num_workers={num_workers} x {_fmt_resources(worker)}); the cluster's {len(nodes)} "
                f"node(s) ({_node_shapes(nodes, per_trial)}) fit {fits_now} trial(s) now. "
                f"scaling.wait_for_resources is true, so up to {concurrency} trials "
                "(tune.max_concurrent_trials) start as the autoscaler adds nodes and the others wait in "
                "Tune's queue; stop with Ctrl-C or `ray job stop`."
            )
        return TrialBudget(driver, worker, per_trial, max_concurrent=concurrency, pending=pending)
    if problem is not None:
        if wait_for_resources:
            problem += " scaling.wait_for_resources has no effect on a local Ray, which never grows."
        elif not local:
            problem += (
                " If the cluster autoscales, set scaling.wait_for_resources=true (and "
                "tune.max_concurrent_trials) to wait for its nodes."
            )
        raise SearchSpaceError(problem)
    limit = fits_now if requested_concurrency is None else min(fits_now, requested_concurrency)
    return TrialBudget(driver=driver, worker=worker, per_trial=per_trial, max_concurrent=max(limit, 1))


def _node_shapes(nodes: Sequence[Mapping[str, float]], resources: Mapping[str, float]) -> str:
    """The nodes' distinct amounts of ``resources``, for messages (at most 4 shown)."""
    shapes = sorted({_fmt_resources({r: float(node.get(r, 0.0)) for r in resources}) for node in nodes})
    return "; ".join(shapes[:4]) + ("; ..." if len(shapes) > 4 else "")


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

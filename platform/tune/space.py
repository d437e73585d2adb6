"""The ``tune`` section turned into what Ray Tune runs: search domains (secrets masked) and a resource
budget.

Everything here is a pure function of the experiment and the cluster's resources (no Ray started), and
trusts a ``tune`` section that ``knet_platform.tune.validation.validate_search`` accepted. The budget
is the one refusal made here, as it depends on the cluster: a trial that does not fit the cluster
would otherwise wait for resources forever (Ray 2.60 retries scheduling without failing), unless
``scaling.wait_for_resources`` says an autoscaler will add nodes. Ray is imported inside the functions
that build domains and budgets, so validating a YAML stays fast.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from knet_platform.errors import KnetUserError
from knet_platform.redaction import redact

CONTINUOUS = ("uniform", "loguniform")
LISTED = ("choice", "grid")

Space = Mapping[str, tuple[str, Sequence[Any]]]


class SearchSpaceError(KnetUserError, ValueError):
    """A search that cannot run as configured (a ``tune.space`` entry Tune cannot sample, a bad ``tune``
    setting, a trial the cluster cannot hold); the message names the key and the fix."""


def to_domain(op: str, args: Sequence[Any]) -> Any:
    """One validated ``tune.space`` entry (``{op: args}`` in YAML) as a Ray Tune domain.

    choice / grid: the listed values. uniform / loguniform: [low, high]. randint: [low, high) integers.
    qrandint: [low, high, q] integers on a grid of q (high inclusive, as Tune's qrandint).
    """
    from ray import tune

    if op in LISTED:
        return tune.choice(list(args)) if op == "choice" else tune.grid_search(list(args))
    if op in CONTINUOUS:
        low, high = float(args[0]), float(args[1])
        return tune.uniform(low, high) if op == "uniform" else tune.loguniform(low, high)
    bounds = [int(value) for value in args]  # validated integers, possibly written as 2.0
    return tune.randint(*bounds) if op == "randint" else tune.qrandint(*bounds)


def param_space(space: Space) -> dict[str, Any]:
    """``{dotted key: (op, args)}`` -> Tune's ``param_space`` (flat, keyed by the dotted key)."""
    return {key: to_domain(op, args) for key, (op, args) in space.items()}


def resolve_space(space: Space, search_alg: str) -> dict[str, tuple[str, list[Any]]]:
    """The space Tune runs for ``search_alg`` (a combination ``check_search_alg`` accepted).

    random: Tune's variant generator; ``grid`` entries are enumerated, every other entry is sampled
    once per trial, and the grid is repeated ``num_samples`` times.
    grid: every entry is enumerated (``choice`` lists become grids).
    optuna: Optuna samples every entry itself.
    """
    if search_alg == "grid":
        return {key: ("grid", list(args)) for key, (_, args) in space.items()}
    return {key: (op, list(args)) for key, (op, args) in space.items()}


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
    from knet_platform.ray_runtime import bundles_on_node, packed_groups, worker_resources

    nodes = [dict(node) for node in nodes] if nodes is not None else [dict(cluster)]
    worker = worker_resources(resources_per_worker, use_gpu)
    driver = {"CPU": float(driver_cpus)}  # > 0: validate_search
    per_trial: dict[str, float] = dict(driver)
    for resource, amount in worker.items():
        per_trial[resource] = per_trial.get(resource, 0.0) + amount * num_workers
    problem = _why_no_trial_fits(
        cluster, nodes, driver, worker, per_trial, num_workers, dict(resources_per_worker), use_gpu
    )
    trials = max(total_trials, 1)
    fits_now = 0
    if problem is None:
        fits_now = min(bundles_on_node(per_trial, cluster), trials)
        # never below 1: the checks above found no proof that a trial cannot fit, only first fit failing
        group = [driver, *([worker] * num_workers)]
        fits_now = min(fits_now, max(packed_groups(nodes, group, limit=fits_now), 1))
    if wait_for_resources and not local:
        assert requested_concurrency is not None, "validate_search requires it with wait_for_resources"
        concurrency = min(requested_concurrency, trials)
        pending = None
        if fits_now < concurrency:
            pending = _waiting_note(nodes, worker, per_trial, num_workers, fits_now, concurrency)
        return TrialBudget(driver, worker, per_trial, max_concurrent=concurrency, pending=pending)
    if problem is not None:
        raise SearchSpaceError(problem + _growing_hint(wait_for_resources, local))
    limit = fits_now if requested_concurrency is None else min(fits_now, requested_concurrency)
    return TrialBudget(driver=driver, worker=worker, per_trial=per_trial, max_concurrent=max(limit, 1))


def _why_no_trial_fits(
    cluster: Mapping[str, float],
    nodes: Sequence[Mapping[str, float]],
    driver: dict[str, float],
    worker: dict[str, float],
    per_trial: dict[str, float],
    num_workers: int,
    resources_per_worker: dict[str, float],
    use_gpu: bool,
) -> str | None:
    """Why a single trial can never start on these nodes and totals (None: no proof it cannot)."""
    from knet_platform.ray_runtime import bundles_on_node, placeable_workers

    gpu_note = (
        " (+ 1 GPU per worker for scaling.use_gpu)" if use_gpu and "GPU" not in resources_per_worker else ""
    )
    driver_cpus = driver["CPU"]
    for name, bundle in (("Train worker", worker), ("trial driver", driver)):
        if bundle and not any(bundles_on_node(bundle, node) for node in nodes):
            return (
                f"one {name} needs {_fmt_resources(bundle)} (scaling.resources_per_worker="
                f"{resources_per_worker}{gpu_note}, tune.trial_driver_cpus={driver_cpus:g}), but no "
                f"Ray node has that much (a worker runs on one node; the nodes have: "
                f"{_node_shapes(nodes, bundle)}); no trial could ever start. Lower "
                "scaling.resources_per_worker or use bigger nodes."
            )
    room = placeable_workers(nodes, worker)
    if room < num_workers:
        return (
            f"one trial needs scaling.num_workers={num_workers} workers of {_fmt_resources(worker)}"
            f"{gpu_note}, but the Ray nodes have room for {room} (a worker runs on one node; the nodes "
            f"have: {_node_shapes(nodes, worker)}); no trial could ever start. Lower scaling.num_workers "
            "or scaling.resources_per_worker, or use bigger nodes."
        )
    if bundles_on_node(per_trial, cluster) < 1:
        has = ", ".join(f"{float(cluster.get(r, 0.0)):g} {r}" for r in per_trial)
        return (
            f"one trial needs {_fmt_resources(per_trial)} (its driver: {driver_cpus:g} CPU + "
            f"scaling.num_workers={num_workers} x {worker}{gpu_note}), but the Ray cluster has {has}; no "
            "trial could ever start. Lower scaling.num_workers or scaling.resources_per_worker, or "
            "tune.trial_driver_cpus, or use a bigger cluster."
        )
    return None


def _growing_hint(wait_for_resources: bool, local: bool) -> str:
    """What a refusal for size adds about a cluster that could grow."""
    if wait_for_resources:
        return " scaling.wait_for_resources has no effect on a local Ray, which never grows."
    if local:
        return ""
    return (
        " If the cluster autoscales, set scaling.wait_for_resources=true (and tune.max_concurrent_trials) "
        "to wait for its nodes."
    )


def _waiting_note(
    nodes: Sequence[Mapping[str, float]],
    worker: dict[str, float],
    per_trial: dict[str, float],
    num_workers: int,
    fits_now: int,
    concurrency: int,
) -> str:
    """What a search waiting for an autoscaler tells the user when fewer trials fit now than it runs."""
    return (
        f"waiting for resources: each trial holds {_fmt_resources(per_trial)} (its driver and "
        f"scaling.num_workers={num_workers} x {_fmt_resources(worker)}); the cluster's {len(nodes)} "
        f"node(s) ({_node_shapes(nodes, per_trial)}) fit {fits_now} trial(s) now. "
        f"scaling.wait_for_resources is true, so up to {concurrency} trials "
        "(tune.max_concurrent_trials) start as the autoscaler adds nodes and the others wait in "
        "Tune's queue; stop with Ctrl-C or `ray job stop`."
    )


def _node_shapes(nodes: Sequence[Mapping[str, float]], resources: Mapping[str, float]) -> str:
    """The nodes' distinct amounts of ``resources``, for messages (at most 4 shown)."""
    shapes = sorted({_fmt_resources({r: float(node.get(r, 0.0)) for r in resources}) for node in nodes})
    return "; ".join(shapes[:4]) + ("; ..." if len(shapes) > 4 else "")


def _fmt_resources(resources: Mapping[str, float]) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in resources.items() if amount > 0) or "nothing"

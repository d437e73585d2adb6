"""The one place an experiment's ``tune`` section is validated, before Ray starts: ``validate_search``
(``knet run`` and ``knet show-config`` both call it). The schema only parses the section's shape (one
known operator and a non-empty list per ``tune.space`` entry); every rule about its values lives here.

Also what a search reads from the section: the space as Tune runs it, the metric and mode, the
per-trial epoch budget.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import types
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from knet_platform.experiment.schema import Experiment, TuneConfig
from knet_platform.knet_adapter import KNetConfig
from knet_platform.train.trainer import validate_for_training
from knet_platform.tune.space import CONTINUOUS, LISTED, SearchSpaceError, Space, resolve_space

EXHAUSTIVE_LIMIT = 64  # integer ranges with at most this many values are validated value by value
RANGE_SAMPLES = 8  # inner values checked (besides both ends) in a longer integer range
COMBINATION_LIMIT = 128  # a space with at most this many value combinations is checked whole
COMBINATION_SAMPLES = 32  # else: this many random combinations
RANGE_FORMS = {  # each range operator's arguments, as messages show them
    "uniform": "[low, high]",
    "loguniform": "[low, high]",
    "randint": "[low, high)",
    "qrandint": "[low, high, q]",
}


def validate_search(experiment: Experiment) -> None:
    """Everything about the ``tune`` section checkable without Ray, cheapest first: its settings; each
    space entry's arguments, and no continuous range on an integer field; the space suits the search
    algorithm (which is installed); the scheduler's budget is ``train.epochs``; the metric is reported
    every epoch (ASHA decides on it after each one); ``tune.max_concurrent_trials`` is set when the search
    waits for an autoscaler; every value a trial can receive gives a valid experiment, alone and with
    the other entries' values (``check_values``); the run itself can train (``validate_for_training``).
    Raises SearchSpaceError (a ValueError from ``validate_for_training``) naming the key and the fix."""
    settings = experiment.tune
    assert settings is not None, "validate_search needs an experiment with a tune section"
    check_settings(settings)
    space = written_space(settings)
    for key, (op, args) in space.items():
        check_entry(key, op, args)
    check_search_alg(space, settings.search_alg, settings.num_samples)
    if settings.search_alg == "optuna":
        require_optuna()
    _check_scheduler(experiment)
    _check_metric_every_epoch(experiment)
    _check_ingest(experiment)
    require_concurrency_when_waiting(experiment.scaling.wait_for_resources, settings.max_concurrent_trials)
    check_values(experiment, space)
    validate_for_training(experiment)


def _check_ingest(experiment: Experiment) -> None:
    """Trials read their data with the DataLoader: Tune packs trials onto every CPU, which would leave
    none for Ray Data's tasks (docs/data-ingest.md)."""
    if experiment.data.ingest.engine == "ray_data":
        raise SearchSpaceError(
            "data.ingest.engine: ray_data streams data for `knet run`; a search's trials read Parquet "
            "shards with the DataLoader. Set data.ingest.engine: auto (or dataloader) for the search."
        )


def check_settings(settings: TuneConfig) -> None:
    """The section's own numbers: what it searches, how many trials, what each trial holds."""
    _require(bool(settings.space), "tune.space", "must name at least one dotted key to search")
    _require(settings.num_samples >= 1, "tune.num_samples", "must be >= 1")
    concurrency = settings.max_concurrent_trials
    _require(concurrency is None or concurrency >= 1, "tune.max_concurrent_trials", "must be >= 1 or null")
    _require(
        settings.trial_driver_cpus > 0,
        "tune.trial_driver_cpus",
        f"must be > 0 (each trial's driver holds that share of a CPU), got {settings.trial_driver_cpus:g}",
    )
    _require(settings.scheduler.grace_period >= 1, "tune.scheduler.grace_period", "must be >= 1")
    _require(settings.scheduler.reduction_factor >= 2, "tune.scheduler.reduction_factor", "must be >= 2")


def check_entry(key: str, op: str, args: Sequence[Any]) -> None:
    """One ``tune.space`` entry's arguments (its shape, one known operator and a non-empty list, is
    parsed by ``SearchSpec.from_dict``). choice / grid: any values (each is checked by ``check_values``).
    uniform / loguniform: numbers [low, high], low < high (loguniform: low > 0). randint: integers
    [low, high), qrandint: integers [low, high, q] with q >= 1 dividing high - low (high inclusive, as
    Tune's qrandint). A continuous range must not feed an integer field (``check_value_type``)."""
    if op in LISTED:
        return
    where = f"tune.space.{key}"
    if len(args) != (3 if op == "qrandint" else 2):
        raise SearchSpaceError(f"{where}: {op} takes {RANGE_FORMS[op]}, got {list(args)}")
    for value in args:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SearchSpaceError(f"{where}: {op} bounds must be numbers, got {value!r}")
        if op not in CONTINUOUS and not float(value).is_integer():
            raise SearchSpaceError(f"{where}: {op} bounds must be integers, got {value!r}")
    low, high = args[0], args[1]
    if low >= high:
        raise SearchSpaceError(f"{where}: {op} needs low < high, got {list(args[:2])}")
    if op == "loguniform" and low <= 0:
        raise SearchSpaceError(f"{where}: loguniform needs low > 0 (got low={low}); use uniform for 0")
    if op == "qrandint" and (args[2] < 1 or (high - low) % args[2] != 0):
        raise SearchSpaceError(
            f"{where}: qrandint [low, high, q] needs q >= 1 dividing high - low (got {list(args)})"
        )
    check_value_type(key, op, field_type(key))


def check_search_alg(space: Space, search_alg: str, num_samples: int) -> None:
    """Refuse what ``search_alg`` would run ambiguously (``resolve_space`` says how each one runs).

    grid: every entry is enumerated, so a range (no list to enumerate) is refused, and so is
    ``num_samples`` > 1 (it would train every configuration again, identically). optuna: Optuna samples
    every entry itself and cannot enumerate, so ``grid`` entries are refused."""
    if search_alg == "grid":
        ranges = [key for key, (op, _) in space.items() if op not in LISTED]
        if ranges:
            op, args = space[ranges[0]]
            raise SearchSpaceError(
                f"tune.space.{ranges[0]}.{op}: tune.search_alg=grid runs every combination of listed "
                f"values, and a range ({op}: {list(args)}) has no list to enumerate. Write its values as "
                "{grid: [...]} (or {choice: [...]}), or use search_alg: random to sample it."
            )
        if num_samples != 1:
            raise SearchSpaceError(
                f"tune.num_samples={num_samples} with tune.search_alg=grid would train every configuration "
                f"{num_samples} times with the same seed; set num_samples: 1 (or use search_alg: random)."
            )
    grids = [key for key, (op, _) in space.items() if op == "grid"]
    if search_alg == "optuna" and grids:
        raise SearchSpaceError(
            f"tune.space.{grids[0]}.grid: tune.search_alg=optuna samples every entry itself and cannot "
            "enumerate a grid; write it as {choice: [...]} (Optuna then picks among the values), or use "
            "search_alg: grid / random."
        )


def require_optuna() -> None:
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch  # noqa: F401
    except ImportError as error:
        raise SearchSpaceError(
            "tune.search_alg=optuna needs the optuna package: pip install 'knet-platform[optuna]' "
            f"(or use search_alg: random) [{error}]"
        ) from None


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


def check_values(experiment: Experiment, space: Space) -> None:
    """Every value a trial may receive gives a valid experiment (``values_to_check``: every listed
    value and every value of a small integer range; a long range: its ends and a sample; a continuous
    range: its ends and middle), and so do the entries' values together (``combinations_to_check``:
    all combinations of a small space, else a sample; e.g. ``model.channels`` must be divisible by
    ``model.update.num_heads``). An unknown key fails here too, with a did-you-mean."""
    base = experiment.without_tune()  # each check builds one experiment, without the search
    candidates = {key: values_to_check(op, args) for key, (op, args) in space.items()}
    for key, values in candidates.items():
        for value in values:
            _try_overrides(base, {key: value}, f"tune.space.{key}: value {value!r} is not valid there")
    if len(candidates) > 1:
        for values in combinations_to_check(candidates):
            together = ", ".join(f"{key}={value!r}" for key, value in values.items())
            _try_overrides(
                base, values, f"tune.space: values valid one by one are not valid together ({together})"
            )


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
    """Joint values of every entry: all combinations when there are at most ``COMBINATION_LIMIT``, else
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
    if op not in CONTINUOUS or field_type is None or _strip_optional(field_type) is not int:
        return
    raise SearchSpaceError(
        f"tune.space.{key}.{op}: {key} is an integer, but {op} samples fractional values (e.g. 1.5); "
        "use {randint: [low, high)} or {qrandint: [low, high, q]} (or list the values with choice/grid)."
    )


def field_type(key: str) -> Any:
    """The declared type of a dotted experiment key (``model.*`` keys: the KNetConfig field), or None
    when the key does not name a typed field (an unknown key is reported by ``check_values``)."""
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


# ---- what a search reads from the section ------------------------------------------------------


def written_space(settings: TuneConfig) -> dict[str, tuple[str, list[Any]]]:
    """``tune.space`` as written: ``{dotted key: (op, args)}``."""
    return {key: (spec.op, list(spec.args)) for key, spec in settings.space.items()}


def space_of(experiment: Experiment) -> dict[str, tuple[str, list[Any]]]:
    """The space as Tune runs it under ``tune.search_alg`` (see ``resolve_space``)."""
    settings = experiment.tune
    return resolve_space(written_space(settings), settings.search_alg)


def metric_and_mode(experiment: Experiment) -> tuple[str, str]:
    settings = experiment.tune
    return settings.metric or experiment.train.metric, settings.mode or experiment.train.mode


def max_epochs(experiment: Experiment) -> int:
    return experiment.tune.scheduler.max_epochs or experiment.train.epochs


def stopped_early(experiment: Experiment, epochs: int) -> bool:
    """Whether a trial that ended without error after ``epochs`` epochs was stopped by the scheduler
    (only ASHA stops trials; validation made its max_t equal to train.epochs)."""
    return experiment.tune.scheduler.type == "asha" and epochs < max_epochs(experiment)


# ---- internals ---------------------------------------------------------------------------------


def _check_scheduler(experiment: Experiment) -> None:
    """The scheduler's per-trial budget is ``train.epochs``: ASHA's ``max_t`` (``tune.scheduler.
    max_epochs``) defaults to it and must not differ, else trials are mislabelled (a max_t above
    train.epochs marks every trial STOPPED_EARLY and its top rungs are never reached; one below cuts
    every trial mid-schedule and calls it COMPLETED), and "same budget per trial" comparisons break."""
    scheduler, epochs = experiment.tune.scheduler, experiment.train.epochs
    if scheduler.max_epochs is not None and scheduler.max_epochs != epochs:
        raise SearchSpaceError(
            f"tune.scheduler.max_epochs={scheduler.max_epochs} differs from train.epochs={epochs}: a trial "
            f"trains train.epochs epochs, and ASHA's max_t must be that budget. Set max_epochs: null (it "
            f"then follows train.epochs) or {epochs}; to change the per-trial budget, set train.epochs."
        )
    if scheduler.type == "asha":
        if "train.epochs" in experiment.tune.space:
            raise SearchSpaceError(
                "tune.space.train.epochs: ASHA gives every trial the same budget (max_t = train.epochs) "
                "and decides when to stop it; remove train.epochs from the space, or use scheduler fifo."
            )
        if scheduler.grace_period > epochs:
            raise SearchSpaceError(
                f"tune.scheduler.grace_period={scheduler.grace_period} is more than train.epochs={epochs}: "
                "ASHA could never stop a trial early; lower grace_period (or use scheduler fifo)."
            )


def _check_metric_every_epoch(experiment: Experiment) -> None:
    metric, _ = metric_and_mode(experiment)
    if metric.startswith("val/") and experiment.train.eval_interval != 1:
        raise SearchSpaceError(
            f"tune.metric={metric!r} is evaluated every {experiment.train.eval_interval} epochs, but the "
            "scheduler needs it every epoch: set train.eval_interval=1 (or search on a train/ metric)."
        )


def _try_overrides(base: Experiment, values: dict[str, Any], problem: str) -> None:
    try:
        base.with_overrides(values)
    except (ValueError, TypeError, KeyError) as error:
        raise SearchSpaceError(f"{problem}: {error}") from None


def _require(condition: bool, key: str, fix: str) -> None:
    if not condition:
        raise SearchSpaceError(f"{key}: {fix}")


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        options = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(options) == 1:
            return options[0]
    return tp

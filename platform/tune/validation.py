"""The experiment's ``tune`` section as a search runs it, and everything about it checkable before Ray
starts: the space as Tune receives it, the metric and mode, the per-trial epoch budget."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from knet_platform.train.trainer import validate_for_training
from knet_platform.tune.space import (
    SearchSpaceError,
    check_value_type,
    combinations_to_check,
    field_type,
    param_space,
    require_concurrency_when_waiting,
    resolve_space,
    values_to_check,
)

if TYPE_CHECKING:
    from knet_platform.experiment.schema import Experiment


def validate_search(experiment: Experiment) -> None:
    """Everything about the ``tune`` section checkable without Ray: the space suits the search
    algorithm (which is installed), each entry parses, no continuous range feeds an integer field,
    every value a trial can receive gives a valid experiment (every listed value and every value of a
    small integer range; a long range: its ends and a sample; a continuous range: its ends and middle),
    and so do the entries' values together (all combinations of a small space, else a sample); the
    scheduler's budget matches ``train.epochs``; the metric is reported every epoch (ASHA decides on
    it after each one)."""
    settings = experiment.tune
    space = space_of(experiment)  # raises SearchSpaceError for a space search_alg cannot run
    if settings.search_alg == "optuna":
        require_optuna()
    param_space(space)  # raises SearchSpaceError naming the entry
    for key, (op, _) in space.items():
        check_value_type(key, op, field_type(key))
    _check_scheduler(experiment)
    raw = experiment.to_dict()
    raw.pop("tune")
    base = type(experiment).from_dict(raw)  # without its tune section: each check builds one experiment
    candidates = {key: values_to_check(op, args) for key, (op, args) in space.items()}
    for key, values in candidates.items():
        for value in values:
            try:
                base.with_overrides({key: value})
            except (ValueError, TypeError, KeyError) as error:
                raise SearchSpaceError(
                    f"tune.space.{key}: value {value!r} is not valid there: {error}"
                ) from None
    if len(candidates) > 1:
        for values in combinations_to_check(candidates):
            try:
                base.with_overrides(values)
            except (ValueError, TypeError, KeyError) as error:
                together = ", ".join(f"{key}={value!r}" for key, value in values.items())
                raise SearchSpaceError(
                    f"tune.space: values valid one by one are not valid together ({together}): {error}"
                ) from None
    metric, _ = metric_and_mode(experiment)
    if metric.startswith("val/") and experiment.train.eval_interval != 1:
        raise SearchSpaceError(
            f"tune.metric={metric!r} is evaluated every {experiment.train.eval_interval} epochs, but the "
            "scheduler needs it every epoch: set train.eval_interval=1 (or search on a train/ metric)."
        )
    if settings.trial_driver_cpus <= 0:
        raise SearchSpaceError("tune.trial_driver_cpus must be > 0 (each trial's driver holds a CPU share)")
    require_concurrency_when_waiting(experiment.scaling.wait_for_resources, settings.max_concurrent_trials)
    validate_for_training(experiment)


def space_of(experiment: Experiment) -> dict[str, tuple[str, list[Any]]]:
    """The space as Tune runs it under ``tune.search_alg`` (see ``resolve_space``)."""
    settings = experiment.tune
    written = {key: (spec.op, list(spec.args)) for key, spec in settings.space.items()}
    return resolve_space(written, settings.search_alg, settings.num_samples)


def metric_and_mode(experiment: Experiment) -> tuple[str, str]:
    settings = experiment.tune
    return settings.metric or experiment.train.metric, settings.mode or experiment.train.mode


def max_epochs(experiment: Experiment) -> int:
    return experiment.tune.scheduler.max_epochs or experiment.train.epochs


def stopped_early(experiment: Experiment, epochs: int) -> bool:
    """Whether a trial that ended without error after ``epochs`` epochs was stopped by the scheduler
    (only ASHA stops trials; validation made its max_t equal to train.epochs)."""
    return experiment.tune.scheduler.type == "asha" and epochs < max_epochs(experiment)


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


def require_optuna() -> None:
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch  # noqa: F401
    except ImportError as error:
        raise SearchSpaceError(
            "tune.search_alg=optuna needs the optuna package: pip install 'knet-platform[optuna]' "
            f"(or use search_alg: random) [{error}]"
        ) from None

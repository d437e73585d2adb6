"""``knet run`` with a ``tune`` section: a Ray Tune search whose every trial is a Ray Train run.

Ray 2.60's supported form: each trial is a Tune *function* that builds the same ``TorchTrainer`` a
plain run uses and fits it, with ``TuneReportCallback`` forwarding every epoch's report to Tune (so
ASHA sees each epoch and can stop the trial). MLflow gets one parent run for the search and one child
run per trial; the driver ends a trial's child run when Tune finishes, stops or loses the trial, so a
trial stopped early ends FINISHED (tagged ``knet.stopped_early``), not FAILED. At the end the best
trial's best checkpoint becomes a registered model version, and the alias moves only if it wins.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from knet_platform.checkpointing import load_checkpoint
from knet_platform.knet_adapter import build_datasets, prepare_data, write_bundle
from knet_platform.ray_runtime import start_ray, stop_ray
from knet_platform.registry import RegisteredModel, log_and_register
from knet_platform.search_space import (
    SearchSpaceError,
    TrialBudget,
    corner_values,
    num_trials,
    param_space,
    plan_budget,
)
from knet_platform.tracking import (
    TrackingTarget,
    check_tracking_reachable,
    create_run,
    end_run,
    log_experiment,
    reopen_run,
    resolve_tracking,
)
from knet_platform.trainer import validate_for_training
from mlflow.tracking import MlflowClient
from ray.tune import Callback

if TYPE_CHECKING:
    from knet_platform.experiment import Experiment

SEARCH_RECORD = "knet_search.json"  # next to the Tune results: which search and MLflow run to resume
TRIAL_TAG, SEARCH_TAG = "knet.trial_id", "knet.search"


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the summary table shows it."""

    trial_id: str
    overrides: dict[str, Any]
    status: str  # COMPLETED | STOPPED_EARLY | ERROR
    metric: float  # the trial's best value of the search metric (NaN when it never reported one)
    epochs: int
    mlflow_run_id: str | None
    checkpoint: str | None  # the checkpoint holding ``metric``
    error: str | None = None


@dataclass
class SearchSummary:
    """What a finished search produced; ``best`` is None only when every trial failed."""

    metric: str
    mode: str
    trials: list[TrialRecord]
    best: TrialRecord | None
    parent_run_id: str
    results_path: str
    mlflow_ui_command: str
    registered: RegisteredModel | None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def model_uri(self) -> str | None:
        return self.registered.alias_uri if self.registered is not None else None

    def render(self) -> str:
        keys = sorted({key for trial in self.trials for key in trial.overrides})
        header = ["trial", *keys, self.metric, "epochs", "status"]
        rows = [
            [
                trial.trial_id,
                *(_short(trial.overrides.get(key)) for key in keys),
                f"{trial.metric:.4f}",
                str(trial.epochs),
                trial.status,
            ]
            for trial in self.trials
        ]
        widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
        lines = ["search finished"]
        for row in [header, *rows]:
            lines.append("  " + "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)))
        if self.best is not None:
            lines.append(f"  best trial       {self.best.trial_id} ({self.metric}={self.best.metric:.4f})")
        lines.append(f"  mlflow run id    {self.parent_run_id} (parent; one child run per trial)")
        if self.registered is not None:
            lines.append(f"  model version    {self.registered.model_uri}")
            lines.append(f"  champion         {self.registered.alias_uri} ({self.registered.reason})")
        lines.append(f"  tune results     {self.results_path} (tensorboard --logdir {self.results_path})")
        lines.append(f"  mlflow ui        {self.mlflow_ui_command}")
        return "\n".join(lines)


def run_search(experiment: Experiment, *, resume: bool = False) -> SearchSummary:
    """Run the experiment's ``tune`` search on Ray Tune; register the best trial's model.

    resume: continue the latest search of this experiment (driver killed): finished trials keep their
    results, unfinished ones continue from their latest checkpoint.
    """
    import ray
    from ray import tune

    settings = experiment.tune
    if settings is None:
        raise ValueError("the experiment has no tune section; run it with knet run as a single training run")
    metric, mode = _metric_and_mode(experiment)
    space = _space_of(experiment)
    validate_search(experiment)
    target = resolve_tracking(experiment)
    check_tracking_reachable(target.tracking_uri)
    prepare_data(experiment)
    record = _latest_record(target, experiment.name) if resume else None

    runtime = start_ray(num_cpus=None)
    try:
        scaling = experiment.scaling
        budget = plan_budget(
            ray.cluster_resources(),
            num_workers=scaling.num_workers,
            resources_per_worker=dict(scaling.resources_per_worker),
            driver_cpus=settings.trial_driver_cpus,
            requested_concurrency=settings.max_concurrent_trials,
            total_trials=num_trials(space, settings.num_samples),
        )
        if record is not None:
            search_name, parent_run_id = record["search_name"], record["mlflow_run_id"]
            reopen_run(target.tracking_uri, parent_run_id)
            print(f"resuming search {search_name} (MLflow run {parent_run_id})")
        else:
            search_name = f"{experiment.name}-search-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
            parent_run_id = create_run(target, search_name, tags={SEARCH_TAG: search_name})
            _write_record(target, experiment.name, search_name, parent_run_id)
            log_experiment(target.tracking_uri, parent_run_id, experiment)
        print(
            f"search {search_name}: {num_trials(space, settings.num_samples)} trials, up to "
            f"{budget.max_concurrent} at once, each holding {_fmt(budget.per_trial)}"
        )
        trainable = tune.with_resources(
            tune.with_parameters(
                _run_trial,
                base=experiment.to_dict(),
                tracking=asdict(target),
                parent_run_id=parent_run_id,
                search_name=search_name,
            ),
            budget.driver,
        )
        results_path = f"{target.storage_path.rstrip('/')}/{search_name}"
        try:
            tuner = _tuner(experiment, trainable, space, budget, search_name, target, parent_run_id, resume)
            grid = tuner.fit()
            summary = _summarise(experiment, grid, metric, mode, target, parent_run_id, results_path)
        except KeyboardInterrupt:
            end_run(target.tracking_uri, parent_run_id, "KILLED")
            raise
        except BaseException:
            end_run(target.tracking_uri, parent_run_id, "FAILED")
            raise
        end_run(target.tracking_uri, parent_run_id, "FINISHED" if summary.best is not None else "FAILED")
    finally:
        stop_ray(runtime)
    print(summary.render())
    if summary.best is None:
        raise RuntimeError(
            f"every trial of search {search_name} failed; their errors are in the table above and in "
            f"each trial's MLflow run (tag knet.error)"
        )
    return summary


def validate_search(experiment: Experiment) -> None:
    """Everything about the ``tune`` section checkable without Ray: each space entry parses, every
    listed value (or both ends of a range) gives a valid experiment, and the metric is reported
    every epoch (ASHA decides on it after each one)."""
    space = _space_of(experiment)
    param_space(space)  # raises SearchSpaceError naming the entry
    for key, (op, args) in space.items():
        for value in corner_values(op, args):
            try:
                experiment.with_overrides({key: value})
            except (ValueError, TypeError, KeyError) as error:
                raise SearchSpaceError(
                    f"tune.space.{key}: value {value!r} is not valid there: {error}"
                ) from error
    metric, _ = _metric_and_mode(experiment)
    if metric.startswith("val/") and experiment.train.eval_interval != 1:
        raise SearchSpaceError(
            f"tune.metric={metric!r} is evaluated every {experiment.train.eval_interval} epochs, but the "
            "scheduler needs it every epoch: set train.eval_interval=1 (or search on a train/ metric)."
        )
    settings = experiment.tune
    if settings.trial_driver_cpus <= 0:
        raise SearchSpaceError("tune.trial_driver_cpus must be > 0 (each trial's driver holds a CPU share)")
    validate_for_training(experiment)


def _run_trial(
    config: dict[str, Any],
    *,
    base: dict[str, Any],
    tracking: dict[str, Any],
    parent_run_id: str,
    search_name: str,
) -> None:
    """One trial (runs in its own Tune actor): the base experiment with this trial's values, trained
    as a Ray Train run whose rank 0 logs into the trial's MLflow child run."""
    from knet_platform.experiment import Experiment
    from knet_platform.trainer import build_trainer
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    experiment = Experiment.from_dict(base).with_overrides(config)
    target = TrackingTarget(**tracking)
    context = tune.get_context()
    trial_id = context.get_trial_id()
    run_id = _child_run(target, parent_run_id, trial_id)
    if run_id is None:
        run_id = create_run(
            target,
            context.get_trial_name(),
            parent_run_id=parent_run_id,
            tags={TRIAL_TAG: trial_id, SEARCH_TAG: search_name},
        )
    else:
        reopen_run(target.tracking_uri, run_id)
    log_experiment(target.tracking_uri, run_id, experiment)
    client = MlflowClient(tracking_uri=target.tracking_uri)
    client.set_tag(run_id, "knet.trial_overrides", json.dumps(config, sort_keys=True, default=str))
    run_name = f"{search_name}-{trial_id}"
    client.set_tag(run_id, "knet.checkpoints", f"{target.storage_path.rstrip('/')}/{run_name}")
    trainer = build_trainer(
        experiment,
        run_name=run_name,
        storage_path=target.storage_path,
        mlflow_run_id=run_id,
        tracking_uri=target.tracking_uri,
        callbacks=[TuneReportCallback()],
    )
    try:
        trainer.fit()
    except BaseException as error:
        # The driver's TrialRunCloser ends the run (FAILED on a trial error). A trial ASHA stops can also
        # land here, interrupted mid-epoch, after the driver already ended its run FINISHED: leave it.
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(run_id, "knet.error", _error_text(error))
        raise


def _tuner(
    experiment: Experiment,
    trainable: Any,
    space: dict[str, tuple[str, list[Any]]],
    budget: TrialBudget,
    search_name: str,
    target: TrackingTarget,
    parent_run_id: str,
    resume: bool,
) -> Any:
    from ray import tune

    settings = experiment.tune
    metric, mode = _metric_and_mode(experiment)
    callback = TrialRunCloser(target, parent_run_id, max_epochs=_max_epochs(experiment))
    if resume:
        path = f"{target.storage_path.rstrip('/')}/{search_name}"
        if not tune.Tuner.can_restore(path):
            raise FileNotFoundError(
                f"nothing to resume at {path}: the search never saved its state. Start it without --resume."
            )
        # Trials that failed stay failed (their error is recorded); unfinished ones continue.
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    return tune.Tuner(
        trainable,
        param_space=param_space(space),
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            scheduler=_scheduler(experiment),
            search_alg=_search_alg(experiment, metric, mode),
            num_samples=settings.num_samples,
            max_concurrent_trials=budget.max_concurrent,
        ),
        run_config=tune.RunConfig(
            name=search_name,
            storage_path=target.storage_path,
            callbacks=[callback],
            # a trial that fails (NaN loss, bad config) fails alone; the search goes on
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )


def _scheduler(experiment: Experiment) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    scheduler = experiment.tune.scheduler
    if scheduler.type == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch",
        max_t=_max_epochs(experiment),
        grace_period=scheduler.grace_period,
        reduction_factor=scheduler.reduction_factor,
    )


def _search_alg(experiment: Experiment, metric: str, mode: str) -> Any:
    algorithm = experiment.tune.search_alg
    if algorithm in ("random", "grid"):
        return None  # Tune's variant generator: random samples, grid_search expanded
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch
    except ImportError as error:
        raise SearchSpaceError(
            "tune.search_alg=optuna needs the optuna package: pip install 'knet-platform[optuna]' "
            "(or use search_alg: random)"
        ) from error
    return OptunaSearch(metric=metric, mode=mode)


class TrialRunCloser(Callback):
    """Tune callback on the driver: ends each trial's MLflow child run when Tune is done with it.

    A trial that ASHA stops is killed without running its own clean-up, so the driver ends its run:
    FINISHED (tagged ``knet.stopped_early``) for completed or stopped trials, FAILED for errors.
    """

    def __init__(self, target: TrackingTarget, parent_run_id: str, max_epochs: int) -> None:
        self.target, self.parent_run_id, self.max_epochs = target, parent_run_id, max_epochs

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epochs = int((trial.last_result or {}).get("epoch", 0))
        self._end(trial, "FINISHED", {"knet.stopped_early": str(epochs < self.max_epochs).lower()})
        run_id = _child_run(self.target, self.parent_run_id, trial.trial_id)
        client = MlflowClient(tracking_uri=self.target.tracking_uri)
        if run_id is not None and "knet.error" in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, "knet.error")  # the interruption of a stopped trial is no error

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FAILED", {"knet.status": "ERROR"})

    def _end(self, trial: Any, status: str, tags: dict[str, str]) -> None:
        run_id = _child_run(self.target, self.parent_run_id, trial.trial_id)
        if run_id is None:
            return  # the trial failed before creating its run
        client = MlflowClient(tracking_uri=self.target.tracking_uri)
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        end_run(self.target.tracking_uri, run_id, status)


def _summarise(
    experiment: Experiment,
    grid: Any,
    metric: str,
    mode: str,
    target: TrackingTarget,
    parent_run_id: str,
    results_path: str,
) -> SearchSummary:
    """The trial table from Tune's results, and the best trial's model registered."""
    max_epochs = _max_epochs(experiment)
    trials = []
    for result in grid:
        trial_id = str(result.metrics.get("trial_id") or Path(result.path).name)
        value, checkpoint = _best_reported(result, metric, mode)
        epochs = int(result.metrics.get("epoch", 0) or 0)
        if result.error is not None:
            status = "ERROR"
        else:
            status = "STOPPED_EARLY" if epochs < max_epochs else "COMPLETED"
        trials.append(
            TrialRecord(
                trial_id=trial_id,
                overrides=dict(result.config),
                status=status,
                metric=value,
                epochs=epochs,
                mlflow_run_id=_child_run(target, parent_run_id, trial_id),
                checkpoint=checkpoint,
                error=_error_text(result.error) if result.error is not None else None,
            )
        )
    trials.sort(key=lambda trial: trial.trial_id)
    candidates = [t for t in trials if t.checkpoint is not None and not math.isnan(t.metric)]
    pick = max if mode == "max" else min
    best = pick(candidates, key=lambda trial: trial.metric) if candidates else None

    client = MlflowClient(tracking_uri=target.tracking_uri)
    client.log_text(
        parent_run_id, json.dumps([asdict(t) for t in trials], indent=2, default=str), "trials.json"
    )
    registered = None
    if best is not None:
        client.set_tag(parent_run_id, "knet.best_trial", best.trial_id)
        client.set_tag(parent_run_id, "knet.best_trial_run_id", str(best.mlflow_run_id))
        client.log_metric(parent_run_id, f"best/{metric}", best.metric)
        registered = _register_best(experiment, best, metric, mode, target, parent_run_id)
    return SearchSummary(
        metric=metric,
        mode=mode,
        trials=trials,
        best=best,
        parent_run_id=parent_run_id,
        results_path=results_path,
        mlflow_ui_command=target.ui_command(),
        registered=registered,
    )


def _register_best(
    experiment: Experiment,
    best: TrialRecord,
    metric: str,
    mode: str,
    target: TrackingTarget,
    parent_run_id: str,
) -> RegisteredModel:
    from ray.train import Checkpoint

    trial_experiment = experiment.with_overrides(best.overrides)
    with tempfile.TemporaryDirectory(prefix="knet-search-") as scratch:
        with Checkpoint(best.checkpoint).as_directory() as folder:
            state = load_checkpoint(folder)
        categories = build_datasets(trial_experiment).categories
        bundle = write_bundle(Path(scratch) / "bundle", trial_experiment, categories, state.model)
        return log_and_register(
            bundle,
            tracking_uri=target.tracking_uri,
            run_id=best.mlflow_run_id or parent_run_id,
            registered_model=target.registered_model,
            alias=target.alias,
            metric=metric,
            metric_value=best.metric,
            mode=mode,
        )


def _best_reported(result: Any, metric: str, mode: str) -> tuple[float, str | None]:
    """The trial's best value of ``metric`` over the epochs that carried a checkpoint, and that
    checkpoint (``TuneReportCallback`` forwards checkpoints as a ``checkpoint_path`` metric)."""
    frame = result.metrics_dataframe
    if frame is None or metric not in frame or "checkpoint_path" not in frame:
        return math.nan, None
    rows = frame[frame["checkpoint_path"].notna() & frame[metric].notna()]
    if rows.empty:
        return math.nan, None
    row = rows.loc[rows[metric].idxmax() if mode == "max" else rows[metric].idxmin()]
    return float(row[metric]), str(row["checkpoint_path"])


def _child_run(target: TrackingTarget, parent_run_id: str, trial_id: str) -> str | None:
    client = MlflowClient(tracking_uri=target.tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _space_of(experiment: Experiment) -> dict[str, tuple[str, list[Any]]]:
    return {key: (spec.op, list(spec.args)) for key, spec in experiment.tune.space.items()}


def _metric_and_mode(experiment: Experiment) -> tuple[str, str]:
    settings = experiment.tune
    return settings.metric or experiment.train.metric, settings.mode or experiment.train.mode


def _max_epochs(experiment: Experiment) -> int:
    return experiment.tune.scheduler.max_epochs or experiment.train.epochs


def _record_path(target: TrackingTarget, experiment_name: str) -> Path:
    if "://" in target.storage_path:
        raise ValueError(
            f"--resume keeps its search record next to the Tune results, which needs a local or mounted "
            f"tracking.storage_path (got {target.storage_path})."
        )
    return Path(target.storage_path) / f"{experiment_name}.{SEARCH_RECORD}"


def _write_record(target: TrackingTarget, experiment_name: str, search_name: str, run_id: str) -> None:
    if "://" in target.storage_path:
        print(f"note: tracking.storage_path {target.storage_path} is remote; this search cannot be --resumed")
        return
    path = _record_path(target, experiment_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"search_name": search_name, "mlflow_run_id": run_id, "tracking_uri": target.tracking_uri}
    path.write_text(json.dumps(record, indent=2))


def _latest_record(target: TrackingTarget, experiment_name: str) -> dict[str, str]:
    path = _record_path(target, experiment_name)
    if not path.is_file():
        raise FileNotFoundError(
            f"nothing to resume: no search of {experiment_name!r} was recorded under {target.storage_path} "
            f"({path.name} is missing). Start it without --resume."
        )
    record = json.loads(path.read_text())
    if record["tracking_uri"] != target.tracking_uri:
        raise ValueError(
            f"the search to resume logged to {record['tracking_uri']}, but tracking.uri is now "
            f"{target.tracking_uri}; resume with the same tracking.uri."
        )
    return record


def _error_text(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= 4000 else text[:4000] + " ..."


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in resources.items() if amount > 0)

"""``knet run`` with a ``tune`` section: a Ray Tune search whose every trial is a Ray Train run.

Ray 2.60's supported form: each trial is a Tune *function* that builds the same ``TorchTrainer`` a
plain run uses and fits it, with ``TuneReportCallback`` forwarding every epoch's report to Tune (so
ASHA sees each epoch and can stop the trial). MLflow gets one parent run for the search and one child
run per trial; the driver ends a trial's child run when Tune finishes, stops or loses the trial, so a
trial stopped early ends FINISHED (tagged ``knet.stopped_early``), not FAILED. At the end the best
trial's best checkpoint becomes a registered model version, and the alias moves only if it wins.

Secrets (``knet_platform.redaction``) are masked in everything a search sends to MLflow, Tune or the
terminal: the space's secret-holding values reach Tune as placeholders (``search_space.MaskedSpace``),
so Tune's printed trial configurations, status table and trial results never hold them, and a trial
gets the real value inside its own process. (Tune's restore file ``tuner.pkl`` pickles this module's
callback, which holds the experiment and the tracking URI as they are.)
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from knet_platform.errors import RunFailedError
from knet_platform.experiment.schema import Experiment
from knet_platform.ray_runtime import start_ray, stop_ray
from knet_platform.redaction import redact, redact_text
from knet_platform.tracking.lifecycle import TrackedRun, register_checkpoint, tracked_run
from knet_platform.tracking.registry import RegisteredModel, prepare_registration
from knet_platform.tracking.resume_record import NothingToResumeError, select_record
from knet_platform.tracking.runs import (
    TrackingTarget,
    check_tracking_reachable,
    create_run,
    end_run,
    log_experiment,
    reopen_run,
    resolve_tracking,
)
from knet_platform.train.preflight import check_before_ray
from knet_platform.train.trainer import build_trainer, fit_with_restarts
from knet_platform.tune.space import (
    MaskedSpace,
    SearchSpaceError,
    TrialBudget,
    mask_space,
    num_trials,
    param_space,
    plan_budget,
)
from knet_platform.tune.validation import (
    max_epochs,
    metric_and_mode,
    require_optuna,
    space_of,
    stopped_early,
    validate_search,
)
from mlflow.tracking import MlflowClient
from ray.train.torch import TorchTrainer
from ray.tune import Callback

TRIAL_TAG, SEARCH_TAG = "knet.trial_id", "knet.search"


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the summary table shows it; ``overrides`` are Tune's values (a secret-holding value
    as its placeholder, see ``MaskedSpace``)."""

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

    @property
    def model_uri(self) -> str | None:
        return self.registered.alias_uri if self.registered is not None else None

    def render(self) -> str:
        keys = sorted({key for trial in self.trials for key in trial.overrides})
        header = ["trial", *keys, self.metric, "epochs", "status"]
        rows = [
            [
                trial.trial_id,
                *(redact_text(_short(trial.overrides.get(key))) for key in keys),
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
        results = redact_text(self.results_path)
        lines.append(f"  tune results     {results} (tensorboard --logdir {results})")
        lines.append(f"  mlflow ui        {self.mlflow_ui_command}")
        return "\n".join(lines)


def run_search(
    experiment: Experiment, *, resume: bool = False, resume_run: str | None = None
) -> SearchSummary:
    """Run the experiment's ``tune`` search on Ray Tune; register the best trial's model.

    resume: continue a search of this experiment (driver killed): ``resume_run`` (its MLflow run id or
    search name), else the newest one MLflow does not hold as FINISHED. Finished trials keep their
    results, unfinished ones continue from their latest checkpoint.
    """
    import ray

    settings = experiment.tune
    if settings is None:
        raise SearchSpaceError(
            "the experiment has no tune section; run it with knet run as a single training run"
        )
    validate_search(experiment)
    space = space_of(experiment)
    masked = mask_space(space)  # what Tune sees, prints and stores
    target = resolve_tracking(experiment)
    check_tracking_reachable(target.tracking_uri)
    record = select_record(target, experiment.name, "search", resume_run) if resume else None
    check_before_ray(experiment)  # data index + model on the meta device: bad input fails before Ray

    runtime = start_ray(num_cpus=None)
    try:
        scaling = experiment.scaling
        # from the cluster's resources now: nodes an autoscaler adds later do not raise it
        budget = plan_budget(
            ray.cluster_resources(),
            nodes=[node["Resources"] for node in ray.nodes() if node.get("Alive")],
            num_workers=scaling.num_workers,
            resources_per_worker=dict(scaling.resources_per_worker),
            use_gpu=scaling.use_gpu,
            driver_cpus=settings.trial_driver_cpus,
            requested_concurrency=settings.max_concurrent_trials,
            total_trials=num_trials(space, settings.num_samples),
            wait_for_resources=scaling.wait_for_resources,
            local=runtime.local,
        )
        concurrency = budget.max_concurrent
        if record is not None:  # Tuner.restore brings back the first start's TuneConfig, unchangeable
            concurrency = record.get("max_concurrent_trials")
            if concurrency != budget.max_concurrent:
                print(
                    f"note: Tune keeps this search's max_concurrent_trials={concurrency or 'unknown'} from "
                    f"its first start; the cluster now fits {budget.max_concurrent} trials at once"
                )
        extras = {"max_concurrent_trials": budget.max_concurrent}  # what Tune restores on --resume
        with tracked_run(experiment, target, "search", record=record, record_extras=extras) as run:
            print(
                f"search {run.name}: {num_trials(space, settings.num_samples)} trials, up to "
                f"{concurrency or '?'} at once, each holding {_fmt(budget.per_trial)}"
            )
            if budget.pending is not None:
                print(budget.pending, flush=True)
            summary = _search(experiment, run, masked, budget, resume)
            run.status = "FINISHED" if summary.best is not None else "FAILED"
    finally:
        stop_ray(runtime)
    print(summary.render())
    if summary.best is None:
        raise RunFailedError(
            f"every trial of search {run.name} failed; their errors are in the table above and in "
            f"each trial's MLflow run (tag knet.error)"
        )
    return summary


def _search(
    experiment: Experiment, run: TrackedRun, masked: MaskedSpace, budget: TrialBudget, resume: bool
) -> SearchSummary:
    """Fit (or restore and continue) the Tune search tracked by ``run``; summarise and register."""
    from ray import tune

    target = run.target
    trainable = tune.with_resources(
        tune.with_parameters(
            _run_trial,
            base=trial_base(experiment),
            masked=masked,
            tracking=asdict(target),
            parent_run_id=run.run_id,
            search_name=run.name,
        ),
        budget.driver,
    )
    tuner = _tuner(experiment, trainable, masked, budget, run.name, target, run.run_id, resume)
    prepared = prepare_registration()  # while the trials train, the driver is idle
    try:
        grid = tuner.fit()
    finally:
        _end_open_trials(target, run.run_id)
    prepared.join()
    results_path = f"{target.storage_path.rstrip('/')}/{run.name}"
    return _summarise(experiment, grid, masked, target, run.run_id, results_path)


def trial_base(experiment: Experiment) -> Experiment:
    """What every trial starts from: the experiment without its search, its data read with the
    DataLoader (``engine: auto``; Tune packs trials onto every CPU, none would be left for Ray Data)."""
    base = experiment.without_tune()
    ingest = dataclasses.replace(base.data.ingest, engine="dataloader")
    return dataclasses.replace(base, data=dataclasses.replace(base.data, ingest=ingest))


def _run_trial(
    config: dict[str, Any],
    *,
    base: Experiment,
    masked: MaskedSpace,
    tracking: dict[str, Any],
    parent_run_id: str,
    search_name: str,
) -> None:
    """One trial (runs in its own Tune actor): the base experiment with this trial's values (``config``
    holds Tune's placeholders; ``masked`` gives the real values back), trained as a Ray Train run whose
    rank 0 logs into the trial's MLflow child run."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    experiment = base.with_overrides(masked.reveal(config))
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
    run_name = f"{search_name}-{trial_id}"
    _log_trial(target, run_id, experiment, config, run_name)

    def make_trainer() -> TorchTrainer:
        return build_trainer(
            experiment,
            run_name=run_name,
            storage_path=target.storage_path,
            mlflow_run_id=run_id,
            tracking_uri=target.tracking_uri,
            callbacks=[TuneReportCallback()],
        )

    # No clean-up here: the driver's TrialRunCloser ends the run and records an error (knet.error).
    # A trial ASHA stops is interrupted mid-epoch; a tag written from here could land after the driver
    # had ended that run FINISHED, whatever this process checked first.
    fit_with_restarts(make_trainer)


def _log_trial(
    target: TrackingTarget, run_id: str, experiment: Experiment, config: dict[str, Any], run_name: str
) -> None:
    """What a trial records in its child run before training, secrets masked: params and the resolved
    YAML, its values (``knet.trial_overrides``) and its checkpoint folder (``knet.checkpoints``)."""
    log_experiment(target.tracking_uri, run_id, experiment)
    client = MlflowClient(tracking_uri=target.tracking_uri)
    client.set_tag(
        run_id, "knet.trial_overrides", json.dumps(redact(dict(config)), sort_keys=True, default=str)
    )
    client.set_tag(run_id, "knet.checkpoints", redact_text(f"{target.storage_path.rstrip('/')}/{run_name}"))


def _tuner(
    experiment: Experiment,
    trainable: Any,
    masked: MaskedSpace,
    budget: TrialBudget,
    search_name: str,
    target: TrackingTarget,
    parent_run_id: str,
    resume: bool,
) -> Any:
    from ray import tune

    settings = experiment.tune
    metric, mode = metric_and_mode(experiment)
    callback = TrialRunCloser(target, parent_run_id, experiment)
    if resume:
        path = f"{target.storage_path.rstrip('/')}/{search_name}"
        if not tune.Tuner.can_restore(path):
            raise NothingToResumeError(
                f"nothing to resume at {redact_text(path)}: the search never saved its state. Start it "
                "without --resume."
            )
        # Trials that failed stay failed (their error is recorded); unfinished ones continue.
        # Tune restores the first start's TuneConfig (scheduler, max_concurrent_trials) with the state.
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    return tune.Tuner(
        trainable,
        param_space=param_space(masked.space),
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
        max_t=max_epochs(experiment),
        grace_period=scheduler.grace_period,
        reduction_factor=scheduler.reduction_factor,
    )


def _search_alg(experiment: Experiment, metric: str, mode: str) -> Any:
    if experiment.tune.search_alg in ("random", "grid"):
        return None  # Tune's variant generator: grid entries expanded (all of them for grid), others sampled
    require_optuna()
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(metric=metric, mode=mode)


class TrialRunCloser(Callback):
    """Tune callback on the driver: ends each trial's MLflow child run when Tune is done with it.

    A trial that ASHA stops is killed without running its own clean-up, so the driver ends its run:
    FINISHED (tagged ``knet.stopped_early``) for completed or stopped trials, FAILED for errors.
    """

    def __init__(self, target: TrackingTarget, parent_run_id: str, experiment: Experiment) -> None:
        self.target, self.parent_run_id, self.experiment = target, parent_run_id, experiment

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        epochs = int((trial.last_result or {}).get("epoch", 0))
        stopped = stopped_early(self.experiment, epochs)
        self._end(trial, "FINISHED", {"knet.stopped_early": str(stopped).lower()})

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FAILED", {"knet.status": "ERROR", "knet.error": _trial_error(trial)})

    def _end(self, trial: Any, status: str, tags: dict[str, str]) -> None:
        run_id = _child_run(self.target, self.parent_run_id, trial.trial_id)
        if run_id is None:
            return  # the trial failed before creating its run
        client = MlflowClient(tracking_uri=self.target.tracking_uri)
        for key, value in tags.items():
            client.set_tag(run_id, key, redact_text(value))
        end_run(self.target.tracking_uri, run_id, status)


def _summarise(
    experiment: Experiment,
    grid: Any,
    masked: MaskedSpace,
    target: TrackingTarget,
    parent_run_id: str,
    results_path: str,
) -> SearchSummary:
    """The trial table from Tune's results, and the best trial's model registered."""
    metric, mode = metric_and_mode(experiment)
    trials = []
    for result in grid:
        trial_id = str(result.metrics.get("trial_id") or Path(result.path).name)
        value, checkpoint = _best_reported(result, metric, mode)
        epochs = int(result.metrics.get("epoch", 0) or 0)
        if result.error is not None:
            status = "ERROR"
        else:
            status = "STOPPED_EARLY" if stopped_early(experiment, epochs) else "COMPLETED"
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
    _log_results(target, parent_run_id, trials, best, metric)
    registered = None
    if best is not None:
        registered = register_checkpoint(
            target,
            best.mlflow_run_id or parent_run_id,
            best.checkpoint,
            metric=metric,
            value=best.metric,
            mode=mode,
        )
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


def _log_results(
    target: TrackingTarget,
    parent_run_id: str,
    trials: list[TrialRecord],
    best: TrialRecord | None,
    metric: str,
) -> None:
    """The search's results in MLflow, secrets masked: each trial's exact best checkpoint (tag
    ``knet.best_checkpoint``, next to ``knet.checkpoints``), the parent's ``trials.json`` and its best
    trial (tags and ``best/<metric>``)."""
    client = MlflowClient(tracking_uri=target.tracking_uri)
    for trial in trials:
        if trial.mlflow_run_id is not None and trial.checkpoint is not None:
            client.set_tag(trial.mlflow_run_id, "knet.best_checkpoint", redact_text(trial.checkpoint))
    table = json.dumps(redact([asdict(t) for t in trials]), indent=2, default=str)
    client.log_text(parent_run_id, table, "trials.json")
    if best is not None:
        client.set_tag(parent_run_id, "knet.best_trial", best.trial_id)
        client.set_tag(parent_run_id, "knet.best_trial_run_id", str(best.mlflow_run_id))
        client.log_metric(parent_run_id, f"best/{metric}", best.metric)


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


def _end_open_trials(target: TrackingTarget, parent_run_id: str) -> None:
    """End as KILLED the child runs still RUNNING once Tune returns or is interrupted: Ctrl-C or
    ``ray job stop`` (SIGTERM, see ``cli.main``) stops trials without :class:`TrialRunCloser` hearing
    of it, and MLflow would show them RUNNING forever. After a search that ran to its end, none is."""
    client = MlflowClient(tracking_uri=target.tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    open_runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'",
    )
    for child in open_runs:
        end_run(target.tracking_uri, child.info.run_id, "KILLED")


def _child_run(target: TrackingTarget, parent_run_id: str, trial_id: str) -> str | None:
    client = MlflowClient(tracking_uri=target.tracking_uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def _trial_error(trial: Any) -> str:
    """The error Tune recorded for a failed trial: it writes it into the trial's local folder just
    before calling ``on_trial_error`` (the copy in storage comes later, at the next sync)."""
    from ray import cloudpickle

    try:
        if trial.pickled_error_file and Path(trial.pickled_error_file).is_file():
            with open(trial.pickled_error_file, "rb") as file:
                return _error_text(cloudpickle.load(file))
        if trial.error_file and Path(trial.error_file).is_file():
            return _truncated(Path(trial.error_file).read_text())
    except Exception as problem:  # unreadable: say so instead of recording nothing
        return f"(Tune's record of this trial's error could not be read: {problem!r})"
    return "(Tune recorded no error for this trial)"


def _error_text(error: BaseException) -> str:
    return _truncated(f"{type(error).__name__}: {error}")


def _truncated(text: str) -> str:
    return text if len(text) <= 4000 else text[:4000] + " ..."


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in resources.items() if amount > 0)

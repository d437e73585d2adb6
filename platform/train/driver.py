"""``knet run``: one experiment from YAML to a registered model.

Order matters: validate, check the tracking store and its MLflow experiment, the model's pinned
requirements and the data (all cheap, before Ray starts), start or connect Ray, check that the cluster
can place the workers, open (or re-open) the MLflow run (``tracking.lifecycle.tracked_run``, shared
with searches), fit the Train run, then register the model bundle its best checkpoint carries
(``register_checkpoint``) and move the alias if it wins. What is printed and logged has its secrets masked (``knet_platform.redaction``).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from knet_platform.errors import RunFailedError, is_deterministic
from knet_platform.experiment.schema import Experiment
from knet_platform.ray_runtime import check_capacity, start_ray, stop_ray
from knet_platform.redaction import redact_text
from knet_platform.tracking.lifecycle import TrackedRun, register_checkpoint, tracked_run
from knet_platform.tracking.registry import RegisteredModel, pinned_requirements, prepare_registration
from knet_platform.tracking.resume_record import select_record
from knet_platform.tracking.runs import (
    RunLogger,
    TrackingTarget,
    check_tracking_reachable,
    ensure_experiment,
    resolve_tracking,
)
from knet_platform.train.checkpoints import require_checkpoint
from knet_platform.train.failures import (
    capacity_message,
    describe_failure,
    memory_kill_message,
    worker_causes,
)
from knet_platform.train.init_from import resolve_init_from
from knet_platform.train.preflight import check_before_ray
from knet_platform.train.trainer import build_trainer, fit_with_restarts, validate_for_training
from ray.exceptions import OutOfMemoryError
from ray.train import TrainingFailedError
from ray.train.torch import TorchTrainer


@dataclass
class RunSummary:
    """What a finished run produced.

    metrics: the best checkpoint's reported metrics; model_uri: ``models:/<name>@<alias>`` (the
    current champion, which is this run's model only when ``registered.is_champion``); tracking_uri:
    the MLflow store holding the run and the model (masked), which ``knet predict --tracking-uri``
    needs unless it is the default under ``$KNET_HOME``.
    """

    metrics: dict[str, float]
    run_id: str
    model_uri: str
    mlflow_ui_command: str
    best_checkpoint: str
    ray_run_name: str
    registered: RegisteredModel
    tracking_uri: str = ""

    def render(self) -> str:
        shown = {
            k: v for k, v in self.metrics.items() if k.startswith(("val/", "train/loss")) or k == "epoch"
        }
        lines = ["run finished", *(f"  {key:<16} {value:.4f}" for key, value in sorted(shown.items()))]
        lines += [
            f"  mlflow run id    {self.run_id}",
            f"  model version    {self.registered.model_uri}",
            f"  champion         {self.model_uri} ({self.registered.reason})",
            f"  best checkpoint  {redact_text(self.best_checkpoint)}",
            f"  mlflow store     {redact_text(self.tracking_uri)}",
            f"  mlflow ui        {self.mlflow_ui_command}",
        ]
        return "\n".join(lines)


def run_experiment(
    experiment: Experiment,
    *,
    resume: bool = False,
    resume_run: str | None = None,
    from_checkpoint: str | None = None,
) -> RunSummary:
    """Train ``experiment`` on Ray Train, track it in MLflow, register the best model.

    resume: continue a run of this experiment (same Ray run name and storage path, same MLflow run) from
    its latest checkpoint: ``resume_run`` (its MLflow run id or Ray run name), else the newest run
    MLflow does not hold as FINISHED. from_checkpoint: a checkpoint folder or an MLflow artifact URI
    (``runs:/<id>/checkpoints/best``) whose weights start this run (fine-tuning).
    """
    if resume and from_checkpoint is not None:
        raise ValueError(
            "--resume continues a run; --from-checkpoint starts a new one from weights: pick one"
        )
    target = resolve_tracking(experiment)
    validate_for_training(experiment)
    check_tracking_reachable(target.tracking_uri)
    record = select_record(target, experiment.name, "run", resume_run) if resume else None
    ensure_experiment(target)  # refuses a changed artifact location before anything runs
    pinned_requirements()  # the model's serving requirements, before hours of training
    check_before_ray(experiment)  # data index + model on the meta device: bad input fails before Ray

    with tempfile.TemporaryDirectory(prefix="knet-init-") as scratch:
        # model.init_from as a local bundle that fits the model, or one error line before Ray
        started = resolve_init_from(experiment, target, Path(scratch), from_checkpoint=from_checkpoint)
        from knet_platform.train.ingest import check_ingest_capacity, local_ray_cpus  # loads Ray Data

        runtime = start_ray(num_cpus=local_ray_cpus(experiment))
        try:
            check_capacity(experiment.scaling, runtime)
            check_ingest_capacity(experiment)
            with tracked_run(experiment, target, "run", record=record) as run:
                summary = _fit_and_register(started, run, from_checkpoint)
        finally:
            stop_ray(runtime)
    print(summary.render())
    return summary


def _fit_and_register(experiment: Experiment, run: TrackedRun, from_checkpoint: str | None) -> RunSummary:
    target = run.target
    logger = RunLogger(target.tracking_uri, run.run_id)
    with tempfile.TemporaryDirectory(prefix="knet-run-") as scratch:
        init_weights = None
        if from_checkpoint is not None:
            init_weights = _local_checkpoint(from_checkpoint, target, Path(scratch))
            logger.set_tag("knet.init_weights_from", from_checkpoint)  # masked by set_tag

        def make_trainer() -> TorchTrainer:
            return build_trainer(
                experiment,
                run_name=run.name,
                storage_path=target.storage_path,
                mlflow_run_id=run.run_id,
                tracking_uri=target.tracking_uri,
                init_weights_from=init_weights,
            )

        prepared = prepare_registration()  # while the workers train, the driver is idle
        try:
            result = fit_with_restarts(make_trainer)
        except (TrainingFailedError, OutOfMemoryError) as error:  # bad data, bad loss, memory kill...
            raise RunFailedError(_failure_message(error)) from error
        prepared.join()
    metric, mode = experiment.train.metric, experiment.train.mode
    checkpoint, metrics = _best(result.best_checkpoints or [], metric, mode)
    value = float(metrics[metric])
    logger.tag_checkpoint("best", checkpoint.path, epoch=int(metrics["epoch"]), metric=metric, value=value)
    if target.log_checkpoints == "best":
        with checkpoint.as_directory() as folder:
            logger.log_checkpoint(folder, "best")
    registered = register_checkpoint(
        target, run.run_id, checkpoint.path, metric=metric, value=value, mode=mode
    )
    return RunSummary(
        metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        run_id=run.run_id,
        model_uri=registered.alias_uri,
        mlflow_ui_command=target.ui_command(),
        best_checkpoint=redact_text(checkpoint.path),
        ray_run_name=run.name,
        registered=registered,
        tracking_uri=redact_text(target.tracking_uri),
    )


def _failure_message(error: TrainingFailedError | OutOfMemoryError) -> str:
    """One line: what failed, and whether ``--resume`` helps (not for input that fails every time)."""
    capacity = capacity_message(error)
    if capacity is not None:
        return f"training failed: {capacity}."
    memory = memory_kill_message(error)
    if memory is not None:
        return (
            f"training failed: {memory}. The run is FAILED in MLflow; `knet run --resume` continues "
            "from the last checkpoint."
        )
    cause = describe_failure(error)
    if any(is_deterministic(c) for c in worker_causes(error)):
        return f"training failed: {cause}. The run is FAILED in MLflow; fix the cause and start it again."
    return (
        f"training failed: {cause}. The worker's traceback is above and the run is FAILED in MLflow; "
        "once the cause is fixed, `knet run --resume` continues from the last checkpoint."
    )


def _best(candidates: list[tuple[Any, dict[str, Any]]], metric: str, mode: str) -> tuple[Any, dict[str, Any]]:
    scored = [
        (c, m) for c, m in candidates if isinstance(m.get(metric), (int, float)) and not math.isnan(m[metric])
    ]
    if not scored:
        raise RunFailedError(
            f"the run reported no checkpoint with a finite {metric!r}; check train.metric against the "
            f"reported keys ({sorted(candidates[0][1]) if candidates else 'no checkpoints at all'})"
        )
    pick = max if mode == "max" else min
    return pick(scored, key=lambda pair: pair[1][metric])


def _local_checkpoint(source: str, target: TrackingTarget, scratch: Path) -> str:
    """A checkpoint folder on this machine: ``source`` itself, or downloaded from MLflow."""
    if "://" in source or source.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(scratch / "init"), tracking_uri=target.tracking_uri
        )
    else:
        local = str(Path(source).expanduser().resolve())
    require_checkpoint(local)  # fails now, naming the folder, if it is not a training checkpoint
    return local

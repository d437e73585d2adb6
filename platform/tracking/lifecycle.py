"""One MLflow run lifecycle, shared by a single training run and a Tune search.

:func:`tracked_run` opens the run (new, or re-opened for ``--resume`` from the experiment's resume
record), logs the experiment, and ends the run with the status the block earned: FINISHED, FAILED on an
error, KILLED on Ctrl-C or a stop (``ray job stop``). :func:`register_checkpoint` turns a training checkpoint into a registered
model version: a checkpoint carries its model bundle (weights, model config, categories), so this
needs neither the dataset nor the optimizer state.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from knet_platform.errors import RunFailedError
from knet_platform.experiment.schema import Experiment
from knet_platform.redaction import redact_text
from knet_platform.tracking.registry import RegisteredModel, log_and_register
from knet_platform.tracking.resume_record import NAME_KEYS, Kind, write_record
from knet_platform.tracking.runs import TrackingTarget, create_run, end_run, log_experiment, reopen_run
from knet_platform.train.checkpoints import model_dir, require_checkpoint
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.train import Checkpoint

# The tag naming the Ray run (or Tune search) on its MLflow run; the checkpoint a model version holds.
CHECKPOINT_TAG = "knet.checkpoint"
NAME_TAGS: dict[str, str] = {"run": "knet.ray_run_name", "search": "knet.search"}


@dataclass
class TrackedRun:
    """An open MLflow run: ``name`` is the Ray Train run (or Tune search) it tracks, under
    ``target.storage_path``. ``status`` is how it ends when its block finishes without an error (a
    search with no successful trial sets FAILED)."""

    target: TrackingTarget
    name: str
    run_id: str
    resumed: bool
    status: str = "FINISHED"


@contextmanager
def tracked_run(
    experiment: Experiment,
    target: TrackingTarget,
    kind: Kind,
    *,
    record: dict[str, Any] | None = None,
    record_extras: dict[str, Any] | None = None,
) -> Iterator[TrackedRun]:
    """Open the run of a ``kind`` ("run" or "search") of ``experiment`` for a block, end it after.

    record: the resume record of the run to continue (``--resume``), else None for a new run, whose
    record is written with ``record_extras`` (e.g. a search's ``max_concurrent_trials``).
    """
    if record is not None:
        run = TrackedRun(target, record[NAME_KEYS[kind]], record["mlflow_run_id"], resumed=True)
        reopen_run(target.tracking_uri, run.run_id)
        what = "Ray run" if kind == "run" else "search"
        print(f"resuming {what} {run.name} (MLflow run {run.run_id})")
    else:
        infix = "-search" if kind == "search" else ""
        # unique: Ray Train resumes any earlier run with the same name and storage path
        name = f"{experiment.name}{infix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        run = TrackedRun(target, name, create_run(target, name, tags={NAME_TAGS[kind]: name}), resumed=False)
        fields = {NAME_KEYS[kind]: name, "mlflow_run_id": run.run_id, **(record_extras or {})}
        write_record(target, experiment.name, kind, fields)
    try:
        log_experiment(target.tracking_uri, run.run_id, experiment)
        yield run
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C; `ray job stop` (Ray's driver: SIGTERM -> exit)
        end_run(target.tracking_uri, run.run_id, "KILLED")
        raise
    except BaseException:
        end_run(target.tracking_uri, run.run_id, "FAILED")
        raise
    end_run(target.tracking_uri, run.run_id, run.status)


def register_checkpoint(
    target: TrackingTarget, run_id: str, checkpoint: str, *, metric: str, value: float, mode: str
) -> RegisteredModel:
    """Log the model bundle inside ``checkpoint`` (a folder or a storage URI Ray Train wrote) as
    ``run_id``'s pyfunc model, register it and move the alias if ``metric=value`` wins (``mode``).

    A checkpoint this run already registered (a resumed run that had finished) is not registered
    again: its version is returned as it is.
    """
    require_working_dir()
    earlier = _registered_version(target, run_id, checkpoint)
    if earlier is not None:
        print(f"checkpoint already registered as {earlier.model_uri}; not registering it again")
        return earlier
    with Checkpoint(checkpoint).as_directory() as folder:  # downloaded when on remote storage
        registered = log_and_register(
            model_dir(require_checkpoint(folder)),
            tracking_uri=target.tracking_uri,
            run_id=run_id,
            registered_model=target.registered_model,
            alias=target.alias,
            metric=metric,
            metric_value=value,
            mode=mode,
        )
    client = MlflowClient(tracking_uri=target.tracking_uri, registry_uri=target.tracking_uri)
    client.set_model_version_tag(registered.name, registered.version, CHECKPOINT_TAG, redact_text(checkpoint))
    return registered


class WorkingDirGoneError(RunFailedError):
    """The process's working directory was deleted under it (a Ray job's unpacked copy)."""


def require_working_dir() -> None:
    """Fail with the path and the way on when this process's working directory no longer exists.

    A ``ray job submit --working-dir`` job runs in Ray's unpacked copy of the folder; two Ray nodes that
    shared a temp dir deleted it mid-run, and registration then died in MLflow with a bare
    ``[Errno 2] No such file or directory``: no path, no hint that the checkpoints were safe.
    """
    try:
        os.getcwd()
    except FileNotFoundError:
        gone = _deleted_cwd()
        raise WorkingDirGoneError(
            f"this process's working directory {gone} was deleted while the run trained (a Ray job's "
            "unpacked --working-dir; two Ray nodes sharing one --temp-dir delete each other's, see "
            "cluster/README.md). The checkpoints under tracking.storage_path are intact: `knet run "
            "--resume` with the same experiment continues from the last one and registers the best."
        ) from None


def _deleted_cwd() -> str:
    """The deleted working directory's path, as Linux still records it (``/proc/self/cwd``)."""
    try:
        return os.readlink("/proc/self/cwd").removesuffix(" (deleted)")
    except OSError:
        return os.environ.get("PWD", "(unknown)")


def _registered_version(target: TrackingTarget, run_id: str, checkpoint: str) -> RegisteredModel | None:
    """The version of ``target.registered_model`` that ``run_id`` registered from ``checkpoint``, if any."""
    client = MlflowClient(tracking_uri=target.tracking_uri, registry_uri=target.tracking_uri)
    name, alias = target.registered_model, target.alias
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    for version in versions:
        if version.tags.get(CHECKPOINT_TAG) == redact_text(checkpoint):
            try:
                holder = client.get_model_version_by_alias(name, alias).version
            except MlflowException:
                holder = None
            champion = str(holder) == str(version.version)
            return RegisteredModel.of(
                name, version.version, alias, is_champion=champion, reason="registered before, by this run"
            )
    return None

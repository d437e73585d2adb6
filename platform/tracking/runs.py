"""MLflow tracking: where runs go, creating and ending them, and what rank 0 logs during training.

Every call names its tracking URI explicitly (``MlflowClient(tracking_uri=...)``): Ray workers run in
other working directories and do not inherit the driver's active run, so nothing here relies on
MLflow's process-global defaults. The driver creates the run and logs what does not depend on the
workers' hardware (params, the resolved YAML); rank 0 of the Train workers logs into it by id through
:class:`RunLogger` (metrics, checkpoints, overlays, system info); the driver ends it with the right
status. Every param, tag and text that goes to MLflow passes through ``knet_platform.redaction``.
"""

from __future__ import annotations

import base64
import fcntl
import json
import logging
import math
import os
import platform as std_platform
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml
from knet_platform.errors import KnetUserError
from knet_platform.experiment.home import knet_home, local_path
from knet_platform.redaction import redact, redact_text
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

if TYPE_CHECKING:
    from knet_platform.experiment.schema import Experiment

LOG_CHECKPOINT_CHOICES = ("best", "all", "none")
_MAX_BATCH = 100  # MLflow accepts at most 100 params (and 1000 metrics) per log_batch call


class TrackingUnreachableError(KnetUserError, RuntimeError):
    """The configured tracking store cannot be reached; raised before Ray starts."""


class ArtifactLocationMismatchError(KnetUserError, ValueError):
    """The MLflow experiment exists with another artifact location than the one configured."""


@dataclass(frozen=True)
class TrackingTarget:
    """The resolved ``tracking`` section: every location absolute, every default filled in.

    artifact_location is None for HTTP tracking servers: the server decides (artifact proxying), so a
    client never writes artifacts to its own disk by accident.
    """

    tracking_uri: str
    artifact_location: str | None
    experiment_name: str
    registered_model: str
    alias: str
    log_checkpoints: str
    storage_path: str

    def __post_init__(self) -> None:
        if self.log_checkpoints not in LOG_CHECKPOINT_CHOICES:
            raise ValueError(
                f"tracking.log_checkpoints={self.log_checkpoints!r} is not one of {LOG_CHECKPOINT_CHOICES}; "
                "use 'best' (upload the best checkpoint), 'all' (every checkpoint) or 'none' (URIs only)."
            )

    @property
    def is_remote(self) -> bool:
        return self.tracking_uri.startswith(("http://", "https://"))

    def ui_command(self) -> str:
        """The command that opens the MLflow UI on this store (secrets in the URIs masked)."""
        if self.is_remote:
            return f"open {redact_text(self.tracking_uri)}"
        command = f"mlflow ui --backend-store-uri {self.tracking_uri}"
        if self.artifact_location is not None:
            command += f" --default-artifact-root {self.artifact_location}"
        return redact_text(command)


def resolve_tracking(experiment: Experiment, cwd: str | Path | None = None) -> TrackingTarget:
    """Fill the ``tracking`` section's defaults (under ``$KNET_HOME``, default ``<cwd>/.knet``) and
    make every path absolute. ``tracking.uri`` unset: ``$MLFLOW_TRACKING_URI`` as MLflow's own clients
    read it, else the sqlite store under ``$KNET_HOME``."""
    base = knet_home(cwd)
    tracking = experiment.tracking
    uri = (
        tracking.uri or os.environ.get("MLFLOW_TRACKING_URI", "").strip() or f"sqlite:///{base / 'mlflow.db'}"
    )
    uri = _absolute_local_uri(uri, cwd)
    remote = uri.startswith(("http://", "https://"))
    if tracking.artifact_location is not None:
        artifact_location: str | None = _absolute_local_uri(tracking.artifact_location, cwd)
    else:
        artifact_location = None if remote else (base / "mlartifacts").as_uri()
    storage_path = tracking.storage_path or str(base / "ray_results")
    if "://" not in storage_path:
        storage_path = str(local_path(storage_path, cwd))
    return TrackingTarget(
        tracking_uri=uri,
        artifact_location=artifact_location,
        experiment_name=tracking.experiment_name or experiment.name,
        registered_model=tracking.registered_model or experiment.name,
        alias=tracking.alias,
        log_checkpoints=tracking.log_checkpoints,
        storage_path=storage_path,
    )


def check_tracking_reachable(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with the fix in the message, when the tracking store cannot be used.

    HTTP(S): the server's ``/health`` endpoint must answer (user-info in the URI is sent as basic
    auth, as MLflow's client does). sqlite / file: the folder must be creatable; a sqlite store is
    also created and migrated now, under a lock (:func:`create_sqlite_store`). The message is one line
    naming the (masked) URI and the fix.
    """
    shown = redact_text(tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        health, headers = _health_request(tracking_uri)
        try:
            request = urllib.request.Request(health, headers=headers)
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                if response.status == 200:
                    return
                reason = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = redact_text(str(getattr(error, "reason", error)))
        raise TrackingUnreachableError(
            f"MLflow tracking server {shown} is not reachable ({reason}). Start it, e.g. "
            f"`mlflow server --host 127.0.0.1 --port <port> --backend-store-uri sqlite:///<abs path>/mlflow.db "
            f"--artifacts-destination <abs path>/mlartifacts`, or set tracking.uri to a running server "
            f"(`--set tracking.uri=...`), or leave tracking.uri unset to use the local store under $KNET_HOME "
            f"(default ./.knet)."
        )
    local = _local_path_of(tracking_uri)
    if local is not None:
        folder = local.parent if tracking_uri.startswith("sqlite:") else local
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TrackingUnreachableError(
                f"MLflow tracking store {shown} cannot be created ({error}). "
                "Point tracking.uri at a writable folder."
            ) from error
        if tracking_uri.startswith("sqlite:"):
            create_sqlite_store(tracking_uri, local)


def create_sqlite_store(tracking_uri: str, db_path: Path) -> None:
    """Create (or migrate) the sqlite store at ``db_path`` while holding an exclusive ``fcntl.flock`` on
    ``<db path>.lock``, so that only one process at a time runs MLflow's table creation and migrations.

    Without it, two ``knet run`` started together on a fresh store both find no tables and both run
    MLflow's alembic migrations, and the store is left broken for good ("Online migration expected to
    match one row", "table _alembic_tmp_tags already exists"). A process that waited here finds the
    store migrated and only checks its schema. The lock file stays beside the store (it is empty).
    MLflow's INFO lines about creating the tables are held back, so that an error found next (e.g.
    nothing to resume) is still the one line a user sees.
    """
    lock_path = db_path.with_name(db_path.name + ".lock")
    store_logger = logging.getLogger("mlflow.store.db.utils")
    level = store_logger.level
    try:
        with open(lock_path, "a") as lock_file:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)  # released when the file is closed
            store_logger.setLevel(logging.WARNING)
            # the first store access creates the tables, runs the migrations and the default experiment
            MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)
    except OSError as error:
        raise TrackingUnreachableError(
            f"MLflow tracking store {redact_text(tracking_uri)} cannot be created ({error}). "
            "Point tracking.uri at a writable folder."
        ) from error
    finally:
        store_logger.setLevel(level)


def ensure_experiment(target: TrackingTarget) -> str:
    """The MLflow experiment id for ``target.experiment_name``, created on first use.

    An existing experiment keeps the artifact location it was created with (MLflow cannot move it),
    so a different configured ``artifact_location`` is refused rather than silently ignored.
    """
    client = MlflowClient(tracking_uri=target.tracking_uri)
    existing = client.get_experiment_by_name(target.experiment_name)
    if existing is None:
        try:
            return client.create_experiment(
                target.experiment_name, artifact_location=target.artifact_location
            )
        except MlflowException as error:  # another run created it between the look-up and here
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            existing = client.get_experiment_by_name(target.experiment_name)
    wanted, actual = target.artifact_location, existing.artifact_location
    if wanted is not None and _same_location(wanted, actual) is False:
        raise ArtifactLocationMismatchError(
            f"MLflow experiment {target.experiment_name!r} already exists with artifact location "
            f"{redact_text(actual)}, but tracking.artifact_location is {redact_text(wanted)}; MLflow keeps an "
            f"experiment's location. Use the existing one (--set tracking.artifact_location={redact_text(actual)}) "
            "or a new tracking.experiment_name."
        )
    return existing.experiment_id


def create_run(
    target: TrackingTarget,
    run_name: str,
    *,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Create a RUNNING run (nested under ``parent_run_id`` when given) and return its id."""
    client = MlflowClient(tracking_uri=target.tracking_uri)
    all_tags = {key: redact_text(str(value)) for key, value in (tags or {}).items()}
    if parent_run_id is not None:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(ensure_experiment(target), tags=all_tags, run_name=run_name)
    return run.info.run_id


def reopen_run(tracking_uri: str, run_id: str) -> None:
    """Mark an ended (failed or killed) run RUNNING again, for ``--resume``."""
    MlflowClient(tracking_uri=tracking_uri).update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))


def end_run(tracking_uri: str, run_id: str, status: str) -> None:
    """End a run with ``FINISHED``, ``FAILED`` or ``KILLED`` (runs stay RUNNING otherwise)."""
    if status not in ("FINISHED", "FAILED", "KILLED"):
        raise ValueError(f"status={status!r}: use FINISHED, FAILED or KILLED")
    with no_printed_urls_with_secrets(tracking_uri):
        MlflowClient(tracking_uri=tracking_uri).set_terminated(run_id, status=status)


_SUPPRESS_URLS_ENV = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


@contextmanager
def no_printed_urls_with_secrets(tracking_uri: str) -> Iterator[None]:
    """Ending a run on an MLflow server prints "View run at: <server URL>/..." with the URL as
    configured, credentials included: switch that print off for a block when the URI holds secrets."""
    if redact_text(tracking_uri) == tracking_uri:
        yield
        return
    previous = os.environ.get(_SUPPRESS_URLS_ENV)
    os.environ[_SUPPRESS_URLS_ENV] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_SUPPRESS_URLS_ENV, None)
        else:
            os.environ[_SUPPRESS_URLS_ENV] = previous


def log_experiment(tracking_uri: str, run_id: str, experiment: Experiment) -> None:
    """Params and the resolved YAML (``experiment.yaml``), secrets masked; logged by the driver, since
    neither depends on the workers' hardware (rank 0 logs ``system_info.json``).

    MLflow params are immutable: on a resumed run, keys already logged keep their first value and a
    changed value is recorded as a tag ``resume.changed.<key>`` instead of failing the run.
    """
    from knet_platform.experiment.schema import flatten_params

    client = MlflowClient(tracking_uri=tracking_uri)
    logged = client.get_run(run_id).data.params
    params = flatten_params(experiment)
    new_params = [Param(key, value) for key, value in params.items() if key not in logged]
    changed = [
        RunTag(f"resume.changed.{key}", value)
        for key, value in params.items()
        if key in logged and logged[key] != value
    ]
    for start in range(0, len(new_params), _MAX_BATCH):
        client.log_batch(run_id, params=new_params[start : start + _MAX_BATCH])
    if changed:
        client.log_batch(run_id, tags=changed)
    client.log_text(run_id, yaml.safe_dump(redact(experiment.to_dict()), sort_keys=False), "experiment.yaml")


SYSTEM_INFO_FILE = "system_info.json"


def system_info(*, device: str | None = None, world_size: int | None = None) -> dict[str, Any]:
    """Versions and hardware of the calling process (rank 0 of the Train workers) that explain a
    run's numbers; ``device`` and ``world_size`` describe the worker group."""
    import mlflow
    import ray
    import torch

    return {
        "logged_by": "rank 0 of the Ray Train workers",
        "world_size": world_size,
        "device": device,
        "python": sys.version.split()[0],
        "platform": std_platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "ray": ray.__version__,
        "mlflow": mlflow.__version__,
    }


NONFINITE_TAG = "knet.nonfinite_metrics"


class RunLogger:
    """What rank 0 logs into the driver's run during training: epoch metrics, per-class results,
    checkpoints, overlays, system info.

    Epoch metrics use the epoch number as the MLflow step. On a resumed or restarted run the epochs
    already in the run are skipped, so a run never shows the same epoch twice. A NaN or infinite
    metric is logged, not dropped (MLflow keeps NaN, and stores +-inf as +-1.8e308), named once in a
    printed warning, and listed in the run's tag ``knet.nonfinite_metrics``.
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id
        history = self.client.get_metric_history(run_id, "epoch")
        self.last_logged_epoch = max((int(m.value) for m in history), default=0)
        tagged = self.client.get_run(run_id).data.tags.get(NONFINITE_TAG, "")
        self.nonfinite_keys: set[str] = {key for key in tagged.split(",") if key}

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> bool:
        """Log one epoch's metrics (``epoch`` counts from 1); False when that epoch is already logged."""
        if epoch <= self.last_logged_epoch:
            return False
        # "epoch" itself is logged once below, at its own step (it is in Ray's report dict too)
        entries = self._metrics({k: v for k, v in metrics.items() if k != "epoch"}, epoch, f"epoch {epoch}")
        entries.append(Metric("epoch", float(epoch), _now_ms(), epoch))
        for start in range(0, len(entries), 1000):
            self.client.log_batch(self.run_id, metrics=entries[start : start + 1000])
        self.last_logged_epoch = epoch
        return True

    def log_per_class(self, per_class: dict[str, dict[str, dict[str, float]]], epoch: int) -> None:
        """Each evaluator's per-class table (``{"panoptic": {"car": {"pq": ...}}, ...}``, class names as
        the dataset's categories give them) as ``eval/per_class_epoch_XXX.json``; a NaN (a class absent
        from both ground truth and predictions) is written as null, so the file is valid JSON."""
        table = {
            task: {
                name: {key: _json_number(value) for key, value in row.items()} for name, row in rows.items()
            }
            for task, rows in per_class.items()
        }
        self.client.log_text(
            self.run_id, json.dumps(table, indent=2), f"eval/per_class_epoch_{epoch:03d}.json"
        )

    def log_step(self, metrics: dict[str, float], global_step: int) -> None:
        """Per-step values (rank 0's loss every ``train.log_every`` steps), at the global step. A
        restarted worker group may log the steps after its checkpoint a second time."""
        entries = self._metrics(metrics, global_step, f"step {global_step}")
        if entries:
            self.client.log_batch(self.run_id, metrics=entries)

    def log_system_info_once(self, info: dict[str, Any]) -> bool:
        """Log ``system_info.json`` unless the run has it already (a restarted worker group or a
        resumed run keeps the first one); True when it was logged now."""
        if any(item.path == SYSTEM_INFO_FILE for item in self.client.list_artifacts(self.run_id)):
            return False
        self.client.log_dict(self.run_id, redact(info), SYSTEM_INFO_FILE)
        return True

    def _metrics(self, metrics: dict[str, Any], step: int, where: str) -> list[Metric]:
        timestamp = _now_ms()
        entries, new_nonfinite = [], []
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"metric {key!r} at {where} is {value!r}: MLflow metrics are numbers")
            value = float(value)
            if not math.isfinite(value) and key not in self.nonfinite_keys:
                new_nonfinite.append(key)
            entries.append(Metric(key, value, timestamp, step))
        if new_nonfinite:
            self.nonfinite_keys.update(new_nonfinite)
            print(
                f"warning: {', '.join(f'{k}={metrics[k]}' for k in new_nonfinite)} at {where}: logged to "
                f"MLflow as is and listed in the run's tag {NONFINITE_TAG}"
            )
            self.client.set_tag(self.run_id, NONFINITE_TAG, ",".join(sorted(self.nonfinite_keys)))
        return entries

    def log_checkpoint(self, checkpoint_dir: str | Path, name: str) -> None:
        """Upload a checkpoint folder under ``checkpoints/<name>`` (its ``metadata.json`` included)."""
        self.client.log_artifacts(self.run_id, str(checkpoint_dir), f"checkpoints/{name}")

    def tag_checkpoint(self, name: str, uri: str, *, epoch: int, metric: str, value: float | None) -> None:
        """Tags that let someone browsing the run see where a checkpoint is and how it ranks:
        ``checkpoint.<name>`` (its storage URI), ``checkpoint.<name>.epoch`` and
        ``checkpoint.<name>.<metric>`` (e.g. ``checkpoint.best.val/pq``; left out when ``value`` is None,
        i.e. the metric was not reported or not finite at that epoch)."""
        tags = [
            RunTag(f"checkpoint.{name}", redact_text(uri)),
            RunTag(f"checkpoint.{name}.epoch", str(epoch)),
        ]
        if value is not None:
            tags.append(RunTag(f"checkpoint.{name}.{metric}", repr(float(value))))
        self.client.log_batch(self.run_id, tags=tags)

    def set_tag(self, key: str, value: str) -> None:
        """Set a tag on the run, secrets in ``value`` masked."""
        self.client.set_tag(self.run_id, key, redact_text(str(value)))

    def log_overlays(self, overlays: list[np.ndarray], epoch: int) -> None:
        """Log rendered overlays ((h, w, 3) uint8 each) as ``overlays/epoch_XXX_i.png``."""
        for index, overlay in enumerate(overlays):
            self.client.log_image(
                self.run_id, overlay, artifact_file=f"overlays/epoch_{epoch:03d}_{index}.png"
            )


def _json_number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _absolute_local_uri(uri: str, cwd: str | Path | None = None) -> str:
    """sqlite / file URIs and bare paths made absolute (``.knet/...`` under ``$KNET_HOME``); other
    URIs unchanged."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        return f"sqlite:///{Path('/' + path).resolve() if path.startswith('/') else local_path(path, cwd)}"
    if uri.startswith("file:"):
        path = uri[len("file://") :] if uri.startswith("file://") else uri[5:]
        return local_path(path, cwd).resolve().as_uri()
    if uri.startswith(("/", ".", "~")):  # a bare path; names like "databricks" stay as they are
        return local_path(uri, cwd).resolve().as_uri()
    return uri


def _health_request(tracking_uri: str) -> tuple[str, dict[str, str]]:
    """The server's ``/health`` URL without user-info, and a basic-auth header carrying it."""
    parts = urllib.parse.urlsplit(tracking_uri)
    headers = {}
    if parts.username is not None:
        user = urllib.parse.unquote(parts.username)
        password = urllib.parse.unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    netloc = parts.netloc.rsplit("@", 1)[-1]
    path = parts.path.rstrip("/") + "/health"
    return urllib.parse.urlunsplit((parts.scheme, netloc, path, "", "")), headers


def _same_location(first: str, second: str) -> bool:
    """Whether two artifact locations name the same place (file URIs and paths compared resolved)."""

    def normal(location: str) -> str:
        if location.startswith("file:") or location.startswith("/"):
            path = (
                location[len("file://") :]
                if location.startswith("file://")
                else location.removeprefix("file:")
            )
            return str(Path(path).resolve())
        return location.rstrip("/")

    return normal(first) == normal(second)


def _local_path_of(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    return None


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)

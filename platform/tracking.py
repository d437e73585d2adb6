"""MLflow tracking: where runs go, creating and ending them, and what rank 0 logs during training.

Every call names its tracking URI explicitly (``MlflowClient(tracking_uri=...)``): Ray workers run in
other working directories and do not inherit the driver's active run, so nothing here relies on
MLflow's process-global defaults. The driver creates the run; rank 0 of the Train workers logs into
it by id through :class:`RunLogger`; the driver ends it with the right status.
"""

from __future__ import annotations

import math
import os
import platform as std_platform
import socket
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

if TYPE_CHECKING:
    from knet_platform.experiment import Experiment

    from knet.structures import Prediction

LOG_CHECKPOINT_CHOICES = ("best", "all", "none")
_MAX_BATCH = 100  # MLflow accepts at most 100 params (and 1000 metrics) per log_batch call


class TrackingUnreachableError(RuntimeError):
    """The configured tracking store cannot be reached; raised before Ray starts."""


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
        """The command that opens the MLflow UI on this store."""
        if self.is_remote:
            return f"open {self.tracking_uri}"
        command = f"mlflow ui --backend-store-uri {self.tracking_uri}"
        if self.artifact_location is not None:
            command += f" --default-artifact-root {self.artifact_location}"
        return command


def resolve_tracking(experiment: Experiment, cwd: str | Path | None = None) -> TrackingTarget:
    """Fill the ``tracking`` section's defaults (under ``<cwd>/.knet/``) and make every path absolute."""
    base = Path(cwd or os.getcwd()).resolve() / ".knet"
    tracking = experiment.tracking
    uri = tracking.uri or f"sqlite:///{base / 'mlflow.db'}"
    uri = _absolute_local_uri(uri)
    remote = uri.startswith(("http://", "https://"))
    if tracking.artifact_location is not None:
        artifact_location: str | None = _absolute_local_uri(tracking.artifact_location)
    else:
        artifact_location = None if remote else (base / "mlartifacts").as_uri()
    storage_path = tracking.storage_path or str(base / "ray_results")
    if "://" not in storage_path:
        storage_path = str(Path(storage_path).expanduser().resolve())
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

    HTTP(S): the server's ``/health`` endpoint must answer. sqlite / file: the folder must be creatable.
    """
    if tracking_uri.startswith(("http://", "https://")):
        health = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=timeout_s) as response:
                if response.status == 200:
                    return
                reason = f"HTTP {response.status}"
        except (urllib.error.URLError, OSError) as error:
            reason = str(getattr(error, "reason", error))
        raise TrackingUnreachableError(
            f"MLflow tracking server {tracking_uri} is not reachable ({reason}). Start it, e.g. "
            f"`mlflow server --host 127.0.0.1 --port <port> --backend-store-uri sqlite:///<abs path>/mlflow.db "
            f"--artifacts-destination <abs path>/mlartifacts`, or set tracking.uri to a running server "
            f"(`--set tracking.uri=...`), or leave tracking.uri unset to use the local store under .knet/."
        )
    local = _local_path_of(tracking_uri)
    if local is not None:
        folder = local.parent if tracking_uri.startswith("sqlite:") else local
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TrackingUnreachableError(
                f"MLflow tracking store {tracking_uri} cannot be created ({error}). "
                "Point tracking.uri at a writable folder."
            ) from error


def ensure_experiment(target: TrackingTarget) -> str:
    """The MLflow experiment id for ``target.experiment_name``, created on first use."""
    client = MlflowClient(tracking_uri=target.tracking_uri)
    existing = client.get_experiment_by_name(target.experiment_name)
    if existing is not None:
        return existing.experiment_id
    return client.create_experiment(target.experiment_name, artifact_location=target.artifact_location)


def create_run(
    target: TrackingTarget,
    run_name: str,
    *,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
) -> str:
    """Create a RUNNING run (nested under ``parent_run_id`` when given) and return its id."""
    client = MlflowClient(tracking_uri=target.tracking_uri)
    all_tags = dict(tags or {})
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
    MlflowClient(tracking_uri=tracking_uri).set_terminated(run_id, status=status)


def log_experiment(tracking_uri: str, run_id: str, experiment: Experiment) -> None:
    """Params (secrets masked by ``flatten_params``), the resolved YAML and system info.

    MLflow params are immutable: on a resumed run, keys already logged keep their first value and a
    changed value is recorded as a tag ``resume.changed.<key>`` instead of failing the run.
    """
    from knet_platform.experiment import flatten_params

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
    client.log_text(run_id, yaml.safe_dump(experiment.to_dict(), sort_keys=False), "experiment.yaml")
    client.log_dict(run_id, system_info(), "system_info.json")


def system_info() -> dict[str, Any]:
    """Versions and hardware that explain a run's numbers."""
    import mlflow
    import ray
    import torch

    return {
        "python": sys.version.split()[0],
        "platform": std_platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "ray": ray.__version__,
        "mlflow": mlflow.__version__,
    }


class RunLogger:
    """What rank 0 logs into the driver's run during training: epoch metrics, checkpoints, overlays.

    Epoch metrics use the epoch number as the MLflow step. On a resumed or restarted run the epochs
    already in the run are skipped, so a run never shows the same epoch twice.
    """

    def __init__(self, tracking_uri: str, run_id: str) -> None:
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id
        history = self.client.get_metric_history(run_id, "epoch")
        self.last_logged_epoch = max((int(m.value) for m in history), default=0)

    def log_epoch(self, metrics: dict[str, float], epoch: int) -> bool:
        """Log one epoch's metrics (``epoch`` counts from 1); False when that epoch is already logged."""
        if epoch <= self.last_logged_epoch:
            return False
        timestamp = _now_ms()
        entries = [
            Metric(key, float(value), timestamp, epoch)
            for key, value in metrics.items()
            if isinstance(value, (int, float)) and math.isfinite(float(value))
        ]
        entries.append(Metric("epoch", float(epoch), timestamp, epoch))
        for start in range(0, len(entries), 1000):
            self.client.log_batch(self.run_id, metrics=entries[start : start + 1000])
        self.last_logged_epoch = epoch
        return True

    def log_step(self, metrics: dict[str, float], global_step: int) -> None:
        """Per-step values (rank 0's loss every ``train.log_every`` steps), at the global step. A
        restarted worker group may log the steps after its checkpoint a second time."""
        timestamp = _now_ms()
        entries = [
            Metric(key, float(value), timestamp, global_step)
            for key, value in metrics.items()
            if math.isfinite(float(value))
        ]
        if entries:
            self.client.log_batch(self.run_id, metrics=entries)

    def log_checkpoint(self, checkpoint_dir: str | Path, name: str) -> None:
        """Upload a checkpoint folder under ``checkpoints/<name>`` (its ``metadata.json`` included)."""
        self.client.log_artifacts(self.run_id, str(checkpoint_dir), f"checkpoints/{name}")

    def tag_checkpoint(self, name: str, uri: str, *, epoch: int, metric: str, value: float | None) -> None:
        """Tags that let someone browsing the run see where a checkpoint is and how it ranks:
        ``checkpoint.<name>`` (its storage URI), ``checkpoint.<name>.epoch`` and
        ``checkpoint.<name>.<metric>`` (e.g. ``checkpoint.best.val/pq``; left out when ``value`` is None,
        i.e. the metric was not reported or not finite at that epoch)."""
        tags = [RunTag(f"checkpoint.{name}", uri), RunTag(f"checkpoint.{name}.epoch", str(epoch))]
        if value is not None:
            tags.append(RunTag(f"checkpoint.{name}.{metric}", repr(float(value))))
        self.client.log_batch(self.run_id, tags=tags)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)

    def log_overlays(self, images: list[np.ndarray], predictions: list[Prediction], epoch: int) -> None:
        """Log each image blended with a colour per predicted segment (``overlays/epoch_XXX_i.png``)."""
        for index, (image, prediction) in enumerate(zip(images, predictions)):
            self.client.log_image(
                self.run_id,
                overlay(image, prediction),
                artifact_file=f"overlays/epoch_{epoch:03d}_{index}.png",
            )


def overlay(image: np.ndarray, prediction: Prediction, alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8 image blended with one colour per segment of the prediction's panoptic,
    instance or semantic part (whichever is present, in that order)."""
    segment_ids = _segment_map(prediction)  # (H, W) int64, 0 = nothing
    palette = np.random.default_rng(0).integers(40, 256, size=(int(segment_ids.max()) + 1, 3))
    palette[0] = 0
    colours = palette[segment_ids].astype(np.float32)  # (H, W) -> (H, W, 3)
    painted = segment_ids[..., None] > 0
    blended = np.where(painted, (1 - alpha) * image.astype(np.float32) + alpha * colours, image)
    return blended.clip(0, 255).astype(np.uint8)


def _segment_map(prediction: Prediction) -> np.ndarray:
    if prediction.panoptic is not None:
        return prediction.panoptic.segment_map.cpu().numpy().astype(np.int64)
    if prediction.instance is not None:
        masks = prediction.instance.masks.cpu().numpy()  # (M, H, W) bool
        ids = np.zeros(masks.shape[1:], dtype=np.int64)
        for index in range(masks.shape[0] - 1, -1, -1):  # highest score painted last, so on top
            ids[masks[index]] = index + 1
        return ids
    if prediction.semantic is not None:
        return prediction.semantic.label_map.cpu().numpy().astype(np.int64) + 1
    raise ValueError("the prediction has no panoptic, instance or semantic part to draw")


def _absolute_local_uri(uri: str) -> str:
    """sqlite / file URIs and bare paths made absolute; other URIs unchanged."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :]
        return f"sqlite:///{Path('/' + path if path.startswith('/') else path).resolve()}"
    if uri.startswith("file:"):
        return Path(uri[len("file://") :] if uri.startswith("file://") else uri[5:]).resolve().as_uri()
    if uri.startswith(("/", ".", "~")):  # a bare path; names like "databricks" stay as they are
        return Path(uri).expanduser().resolve().as_uri()
    return uri


def _local_path_of(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    if uri.startswith("file://"):
        return Path(uri[len("file://") :])
    return None


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)

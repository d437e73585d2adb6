"""``model.init_from`` on the driver: the model a run starts from, made a local bundle folder and checked
against the experiment's model before Ray starts.

An unknown URI, a folder that is neither a bundle nor a checkpoint, or a model of another backbone,
stage count or width fails the same way on every worker: here it is one ``error:`` line in seconds. The
workers get the local folder in the experiment they are shipped (``knet_platform.train.worker``
loads it with ``knet.weights.transfer``); MLflow's params keep the URI the YAML wrote.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import mlflow
from knet_platform.errors import KnetUserError
from knet_platform.experiment.schema import Experiment
from knet_platform.knet_adapter import KnetInputError, bundle_config, check_transferable
from knet_platform.redaction import redact_text
from knet_platform.tracking.registry import download_model
from knet_platform.tracking.runs import TrackingTarget
from knet_platform.train.checkpoints import METADATA_FILE, model_dir, require_checkpoint
from mlflow.exceptions import MlflowException

_RUN_MODEL_URI = re.compile(r"runs:/[^/]+/model/?")  # a run's logged model, not a checkpoint artifact


class InitFromError(KnetUserError, ValueError):
    """``model.init_from`` names no usable model, or one that does not fit the experiment's model."""


def resolve_init_from(
    experiment: Experiment, target: TrackingTarget, scratch: Path, *, from_checkpoint: str | None
) -> Experiment:
    """``experiment`` with ``model.init_from`` as a local bundle folder (downloaded into ``scratch``
    when it is a URI) whose model fits the experiment's outside the class-specific layers."""
    source = experiment.model.init_from
    if source is None:
        return experiment
    if from_checkpoint is not None:
        raise InitFromError(
            "model.init_from starts a new model from another one's weights and --from-checkpoint from one "
            "of our own checkpoints: pick one (drop --from-checkpoint, or remove model.init_from)"
        )
    try:
        bundle = _bundle_folder(source, target, scratch)
        check_transferable(bundle_config(bundle), experiment.model_config())
    except (KnetUserError, KnetInputError) as error:
        raise InitFromError(f"model.init_from: {error}") from None
    except MlflowException as error:
        cause = " ".join(str(error.message).strip().splitlines()[:1]) or error.error_code
        raise InitFromError(
            f"model.init_from: {redact_text(source)}: {cause} (MLflow store {redact_text(target.tracking_uri)})"
        ) from None
    print(f"init_from: {redact_text(source)}", flush=True)
    return dataclasses.replace(experiment, model=experiment.model.with_init_from(str(bundle)))


def _bundle_folder(source: str, target: TrackingTarget, scratch: Path) -> Path:
    """A registered or logged model (``models:/``, ``runs:/<id>/model``), or a checkpoint's bundle
    (a folder, or an artifact URI such as ``runs:/<id>/checkpoints/best``), or a bundle folder."""
    if source.startswith("models:") or _RUN_MODEL_URI.fullmatch(source):
        return download_model(source, target.tracking_uri, scratch)
    folder = Path(source)
    if "://" in source or source.startswith(("runs:", "mlflow-artifacts:")):
        folder = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=str(scratch), tracking_uri=target.tracking_uri
            )
        )
    if (folder / METADATA_FILE).is_file():  # a training checkpoint: its bundle is model/
        return model_dir(require_checkpoint(folder))
    return folder  # a bundle; bundle_config names a file it lacks

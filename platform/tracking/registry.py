"""The MLflow model registry: log a model bundle as a pyfunc, register it, move the alias if it wins.

The model version carries the metric it was selected by as tags (``knet.metric``, ``knet.metric_value``,
``knet.metric_mode``), so the next run can compare itself with the current champion without opening
the champion's run. ``download_model`` is the way back: a ``models:/...`` URI to a bundle folder that
``knet.bundle.load_bundle`` reads.
"""

from __future__ import annotations

import math
import os
import re
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import mlflow
import yaml
from knet_platform.errors import KnetUserError
from knet_platform.redaction import redact_text
from knet_platform.tracking.runs import (
    TrackingUnreachableError,
    check_tracking_reachable,
    no_printed_urls_with_secrets,
)
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

PYFUNC_MODEL_FILE = Path(__file__).with_name("pyfunc_model.py")
MODEL_ARTIFACT_NAME = "model"
METRIC_TAG, VALUE_TAG, MODE_TAG = "knet.metric", "knet.metric_value", "knet.metric_mode"
_RUNTIME_REQUIREMENTS = ("torch", "torchvision", "timm", "numpy", "scipy", "pillow", "pycocotools", "pyyaml")


@dataclass(frozen=True)
class RegisteredModel:
    """A registered version and whether it now holds the alias.

    model_uri: ``models:/<name>/<version>``; alias_uri: ``models:/<name>@<alias>`` (the champion, which
    may be an older version when this one did not win); reason: why the alias moved or stayed.
    """

    name: str
    version: str
    model_uri: str
    alias: str
    alias_uri: str
    is_champion: bool
    reason: str

    @classmethod
    def of(
        cls, name: str, version: str | int, alias: str, *, is_champion: bool, reason: str
    ) -> RegisteredModel:
        """Version ``version`` of ``name``, with both of its URIs."""
        return cls(
            name=name,
            version=str(version),
            model_uri=f"models:/{name}/{version}",
            alias=alias,
            alias_uri=f"models:/{name}@{alias}",
            is_champion=is_champion,
            reason=reason,
        )


def log_and_register(
    bundle_dir: str | Path,
    *,
    tracking_uri: str,
    run_id: str,
    registered_model: str,
    alias: str,
    metric: str,
    metric_value: float,
    mode: str,
) -> RegisteredModel:
    """Log ``bundle_dir`` as the run's pyfunc model, register a new version of ``registered_model``
    and give it ``alias`` when its metric beats the current holder's (or no version holds it yet)."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode={mode!r}: use 'max' or 'min'")
    version = _log_version(bundle_dir, tracking_uri, run_id, registered_model)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    for key, value in ((METRIC_TAG, metric), (VALUE_TAG, repr(float(metric_value))), (MODE_TAG, mode)):
        client.set_model_version_tag(registered_model, version.version, key, value)
    wins, reason = _beats_champion(client, registered_model, alias, metric, float(metric_value), mode)
    if wins:
        client.set_registered_model_alias(registered_model, alias, version.version)
    return RegisteredModel.of(registered_model, version.version, alias, is_champion=wins, reason=reason)


def register_unscored(
    bundle_dir: str | Path,
    *,
    tracking_uri: str,
    run_id: str,
    registered_model: str,
    alias: str,
    tags: dict[str, str],
) -> RegisteredModel:
    """Log and register a model that has no metric yet (imported weights), with ``tags``. Without a
    metric there is nothing to beat: it takes ``alias`` only when no version holds it yet."""
    version = _log_version(bundle_dir, tracking_uri, run_id, registered_model)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    for key, value in tags.items():
        client.set_model_version_tag(registered_model, version.version, key, redact_text(value))
    try:
        holder = client.get_model_version_by_alias(registered_model, alias)
    except MlflowException:
        holder = None
    if holder is None:
        client.set_registered_model_alias(registered_model, alias, version.version)
        reason = f"no version held '{alias}' yet"
    else:
        reason = (
            f"version {holder.version} holds '{alias}' and this version has no metric to beat it with; "
            f"evaluate it (knet eval) and move the alias by hand if it should win: "
            f"MlflowClient().set_registered_model_alias({registered_model!r}, {alias!r}, {version.version})"
        )
    return RegisteredModel.of(
        registered_model, version.version, alias, is_champion=holder is None, reason=reason
    )


def _log_version(
    bundle_dir: str | Path, tracking_uri: str, run_id: str, registered_model: str
) -> ModelVersion:
    """Log ``bundle_dir`` as ``run_id``'s pyfunc model and register it: the new ModelVersion."""
    with _store(tracking_uri):
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT_NAME,
                python_model=str(PYFUNC_MODEL_FILE),
                artifacts={"bundle": str(bundle_dir)},
                pip_requirements=pinned_requirements(),
            )
        return mlflow.register_model(info.model_uri, registered_model)


def prepare_registration() -> threading.Thread:
    """Do, in a background thread at the lowest CPU priority, the one slow part of the first
    ``log_model`` of a process, so registration after training does not wait for it.

    ``mlflow.pyfunc.log_model`` checks the pinned requirements against the installed packages, and its
    first check maps every installed file to its package (``importlib_metadata.packages_distributions``:
    1.4 s on a 2-core machine, 70% of a registration); MLflow keeps the map for the process. A driver
    waits idle while its workers train: this makes the same check then (its result is the same: the pins
    are the installed versions), with ``mlflow.pyfunc`` imported. Lowest priority (Linux sets it per
    thread), so workers sharing the machine keep their CPU. Callers join the thread before registering.
    Registration does not depend on it: with an MLflow that has no such check, or after a failed warm-up
    (its traceback printed by the thread), ``log_model`` does its own work as before.
    """

    def warm_up() -> None:
        if sys.platform == "linux":  # elsewhere setpriority would lower the whole process
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        import mlflow.pyfunc  # noqa: F401  (log_model's module)
        from mlflow.utils import requirements_utils

        check = getattr(requirements_utils, "warn_dependency_requirement_mismatches", None)
        if check is not None:
            check(pinned_requirements())

    thread = threading.Thread(target=warm_up, name="knet-prepare-registration", daemon=True)
    thread.start()
    return thread


def download_model(model_uri: str, tracking_uri: str, dst: str | Path) -> Path:
    """Download a logged/registered model (``models:/name@alias``, ``models:/name/3``,
    ``runs:/<run_id>/model``, ``mlflow-artifacts:/...``) into ``dst`` and return its bundle folder (what
    ``knet.bundle.load_bundle`` reads).

    Reading only: the store is checked first (a server must answer at once rather than after MLflow's
    minutes of retries; a local store must already exist, never created empty), and a URI the store
    does not hold is a ``ModelNotFoundError`` rather than MLflow's exception.
    """
    _check_model_uri(model_uri, tracking_uri)
    check_store_readable(tracking_uri)
    with _store(tracking_uri):
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
        except MlflowException as error:
            cause = " ".join(str(error.message).strip().splitlines()[:1]) or error.error_code
            raise ModelNotFoundError(
                f"{model_uri}: {cause.rstrip('.')} (MLflow store {redact_text(tracking_uri)}). Check the "
                "model name, version or alias (`mlflow ui` lists them), or pass the store that holds it "
                "(--tracking-uri)."
            ) from error
    mlmodel = local / "MLmodel"
    if not mlmodel.is_file():
        hint = " (a run's model is runs:/<run_id>/model)" if model_uri.startswith("runs:") else ""
        raise NotAKnetModelError(f"{model_uri} is not an MLflow model (no MLmodel file in {local}){hint}.")
    flavors = yaml.safe_load(mlmodel.read_text()).get("flavors", {})
    artifacts = flavors.get("python_function", {}).get("artifacts", {})
    if "bundle" not in artifacts:
        raise NotAKnetModelError(
            f"{model_uri} is not a knet model: its pyfunc flavor has no 'bundle' artifact "
            f"(found {sorted(artifacts)}). Log models with knet_platform.tracking.registry.log_and_register."
        )
    return local / artifacts["bundle"]["path"]


MODEL_URI_FORMS = "models:/<name>@<alias>, models:/<name>/<version> or runs:/<run_id>/model"
_MODELS_URI = re.compile(r"models:/[^/@]+(/[^/@]+|@[^/@]+)/?")
_RUNS_URI = re.compile(r"runs:/[^/]+(/.*)?")


def _check_model_uri(model_uri: str, tracking_uri: str) -> None:
    """A malformed ``models:/`` or ``runs:/`` URI, or an ``mlflow-artifacts:/`` one without a server,
    is refused before MLflow is asked (its messages for these are long and name no fix)."""
    if model_uri.startswith("models:") and not _MODELS_URI.fullmatch(model_uri):
        raise ModelNotFoundError(f"{model_uri} is not a model URI: write {MODEL_URI_FORMS}")
    if model_uri.startswith("runs:") and not _RUNS_URI.fullmatch(model_uri):
        raise ModelNotFoundError(f"{model_uri} is not a run URI: write runs:/<run_id>/model")
    if model_uri.startswith("mlflow-artifacts:") and not tracking_uri.startswith(("http://", "https://")):
        raise ModelNotFoundError(
            f"{model_uri} is served by an MLflow tracking server, but the store is "
            f"{redact_text(tracking_uri)}: pass the server's URL with --tracking-uri http(s)://..."
        )


def check_store_readable(tracking_uri: str) -> None:
    """Fail fast when a store a model is to be read from cannot be: a server that does not answer
    (``check_tracking_reachable``), or a local sqlite file / file-store folder that does not exist
    (MLflow would create it empty, and then report the model missing)."""
    if tracking_uri.startswith(("http://", "https://")):
        check_tracking_reachable(tracking_uri)
        return
    local = _local_store_path(tracking_uri)
    if local is not None and not local.exists():
        raise TrackingUnreachableError(
            f"MLflow store {redact_text(tracking_uri)} does not exist ({local} is missing): pass the "
            "store that holds the model with --tracking-uri (or $MLFLOW_TRACKING_URI), or set KNET_HOME "
            "to the folder `knet run` wrote to."
        )


def _local_store_path(tracking_uri: str) -> Path | None:
    """The file of a ``sqlite:///`` store or the folder of a ``file:`` / plain-path store; None for
    servers, in-memory databases and other schemes."""
    if tracking_uri.startswith("sqlite:///"):
        database = tracking_uri[len("sqlite:///") :].split("?", 1)[0]
        return None if database in ("", ":memory:") else Path(database)
    if tracking_uri.startswith("file:"):
        return Path(urllib.parse.urlparse(tracking_uri).path)
    if ":" not in tracking_uri.split("/", 1)[0] and not tracking_uri.startswith("databricks"):
        return Path(tracking_uri)  # MLflow reads a plain path as a file store
    return None


@contextmanager
def _store(tracking_uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (tracking and registry) at ``tracking_uri`` for a block, then put the
    process's MLflow state back exactly as it was.

    ``log_model`` needs the fluent API, and resolving ``models:/name@alias`` reads the process-wide
    registry URI even when a tracking URI is passed explicitly. "As it was" includes "not set": MLflow's
    setters also write ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` into the environment, so
    restoring the *resolved* previous URIs would pin the default of this moment's working directory
    (and a second model load elsewhere would look in the wrong store).
    """
    from mlflow.tracking._model_registry import utils as registry_state  # MLflow keeps no public getter
    from mlflow.tracking._tracking_service import utils as tracking_state  # of "set explicitly or not"

    saved_env = {name: os.environ.get(name) for name in _URI_ENV}
    saved_tracking, saved_registry = tracking_state._tracking_uri, registry_state._registry_uri
    # a model is a handful of files: MLflow's download progress bars are noise in a run's log
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        with no_printed_urls_with_secrets(tracking_uri):
            yield
    finally:
        mlflow.set_tracking_uri(saved_tracking)
        mlflow.set_registry_uri(saved_registry)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def _beats_champion(
    client: MlflowClient, name: str, alias: str, metric: str, value: float, mode: str
) -> tuple[bool, str]:
    if math.isnan(value):
        return False, f"{metric} is NaN; the alias '{alias}' stays where it is"
    try:
        champion = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return True, f"no version held '{alias}' yet"
    tags = champion.tags
    if METRIC_TAG not in tags:  # registered without a metric (register_unscored: imported weights)
        return False, (
            f"version {champion.version} holds '{alias}' without a metric (imported weights); compare the "
            f"two with knet eval and move the alias by hand if this model should win: "
            f"MlflowClient().set_registered_model_alias({name!r}, {alias!r}, <version>)"
        )
    if tags.get(METRIC_TAG) != metric or tags.get(MODE_TAG) != mode:
        return False, (
            f"version {champion.version} holds '{alias}' by {tags.get(METRIC_TAG)!r} ({tags.get(MODE_TAG)}), "
            f"not comparable with {metric!r} ({mode}); move the alias by hand if this model should win: "
            f"MlflowClient().set_registered_model_alias({name!r}, {alias!r}, <version>)"
        )
    current = float(tags[VALUE_TAG])
    better = value > current if mode == "max" else value < current
    relation = "beats" if better else "does not beat"
    return better, f"{metric}={value:.4g} {relation} version {champion.version}'s {current:.4g} ({mode})"


class NotAKnetModelError(KnetUserError, ValueError):
    """A model URI that names something other than a model logged by :func:`log_and_register`."""


class ModelNotFoundError(KnetUserError, LookupError):
    """A model URI that is malformed, or names a model, version, alias or run the store does not hold."""


class MissingRequirementError(KnetUserError, RuntimeError):
    """A package the model's serving environment needs is not installed here, so it cannot be pinned."""


def pinned_requirements() -> list[str]:
    """The serving environment's pins: the installed versions of what a bundle needs to run.

    Every one of them is a dependency of knet-platform, so a missing one means a broken installation:
    refused (naming the packages) rather than logging a model whose requirements silently lack it.
    """
    pins, missing = [], []
    for package in _RUNTIME_REQUIREMENTS:
        try:
            pins.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            missing.append(package)
    if missing:
        raise MissingRequirementError(
            f"cannot pin {', '.join(missing)} in the model's requirements: not installed in this "
            "environment, although knet-platform depends on them. Reinstall it (pip install -e '.[platform]')."
        )
    return pins

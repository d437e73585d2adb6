"""The record ``knet run --resume`` reads to pick the run or search of an experiment to continue.

One small JSON file per experiment and kind next to the Ray results (``<name>.knet_run.json``,
``<name>.knet_search.json``). Each run started appends an entry (the Ray run or Tune search name, the
MLflow run id, the tracking URI in its masked form) to its ``runs`` list; the newest entry's fields are
also at the top level. ``--resume`` takes the newest run MLflow does not hold as FINISHED (a killed or
failed one), ``--resume RUN`` the one named, so a later run never hides the one that failed.

Resume compares masked URIs, so a rotated password still resumes and the file never holds a secret.
Entries are appended under an exclusive lock (two runs started together both stay recorded) and written
by temp file + rename: a driver killed mid-write leaves the previous record whole.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from knet_platform.errors import KnetUserError
from knet_platform.redaction import redact_text
from knet_platform.tracking.runs import TrackingTarget
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

Kind = Literal["run", "search"]
RECORD_FILES: dict[str, str] = {"run": "knet_run.json", "search": "knet_search.json"}
NAME_KEYS: dict[str, str] = {"run": "ray_run_name", "search": "search_name"}
KEEP_ENTRIES = 100  # the newest runs a record remembers


class NothingToResumeError(KnetUserError, FileNotFoundError):
    """``--resume`` found no run or search of this experiment to continue."""


class ResumeMismatchError(KnetUserError, ValueError):
    """``--resume`` cannot continue the recorded run or search with the experiment as it is now."""


def write_record(target: TrackingTarget, experiment_name: str, kind: Kind, fields: dict[str, Any]) -> None:
    """Record the run or search just started (``fields``: its names and ids) for a later --resume; a
    remote storage path cannot hold it, which is said once here rather than at resume time."""
    if _is_remote(target):
        shown = redact_text(target.storage_path)
        print(f"note: tracking.storage_path {shown} is remote; this {kind} cannot be --resumed")
        return
    path = _record_path(target, experiment_name, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {
        **fields,
        "tracking_uri": redact_text(target.tracking_uri),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    with _locked(path):
        runs = [*_entries(path), entry][-KEEP_ENTRIES:]
        partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        partial.write_text(json.dumps({**entry, "runs": runs}, indent=2))
        os.replace(partial, path)


def select_record(
    target: TrackingTarget, experiment_name: str, kind: Kind, run: str | None = None
) -> dict[str, Any]:
    """The record entry ``--resume`` continues: the run (or search) named by ``run`` (its MLflow run id
    or its Ray run / search name), else the newest one MLflow does not hold as FINISHED."""
    entries = _recorded(target, experiment_name, kind)
    if run is not None:
        chosen = [e for e in entries if run in (e.get("mlflow_run_id"), e.get(NAME_KEYS[kind]))]
        if not chosen:
            raise NothingToResumeError(
                f"--resume {run}: no {kind} of {experiment_name!r} with that MLflow run id or name was "
                f"recorded under {target.storage_path}; recorded: {_listing(entries, kind)}."
            )
        return _same_store(chosen[-1], target, kind)
    client = MlflowClient(tracking_uri=target.tracking_uri)
    for entry in reversed(entries):
        _same_store(entry, target, kind)
        if _status(client, entry["mlflow_run_id"]) not in ("FINISHED", None):
            return entry
    raise NothingToResumeError(
        f"nothing to resume: every recorded {kind} of {experiment_name!r} finished (newest: "
        f"{_listing(entries[-1:], kind)}). Start a new one without --resume, or continue a given one "
        f"with --resume RUN_ID."
    )


def latest_record(target: TrackingTarget, experiment_name: str, kind: Kind) -> dict[str, Any]:
    """The newest record entry of ``experiment_name``, finished or not, checked against ``target``."""
    return _same_store(_recorded(target, experiment_name, kind)[-1], target, kind)


def _recorded(target: TrackingTarget, experiment_name: str, kind: Kind) -> list[dict[str, Any]]:
    if _is_remote(target):
        raise ResumeMismatchError(
            f"--resume keeps its {kind} record next to the Ray results, which needs a local or mounted "
            f"tracking.storage_path (got {redact_text(target.storage_path)})."
        )
    path = _record_path(target, experiment_name, kind)
    entries = _entries(path)
    if not entries:
        raise NothingToResumeError(
            f"nothing to resume: no {kind} of {experiment_name!r} was recorded under {target.storage_path} "
            f"({path.name} is missing). Start it without --resume (or set the KNET_HOME or "
            f"tracking.storage_path the {kind} was started with)."
        )
    return entries


def _entries(path: Path) -> list[dict[str, Any]]:
    """The recorded entries, oldest first (a record written before entries were kept is one entry)."""
    if not path.is_file():
        return []
    record = json.loads(path.read_text())
    if "runs" in record:
        return list(record["runs"])
    return [record]


def _same_store(entry: dict[str, Any], target: TrackingTarget, kind: Kind) -> dict[str, Any]:
    if redact_text(entry["tracking_uri"]) != redact_text(target.tracking_uri):
        raise ResumeMismatchError(
            f"the {kind} to resume logged to {redact_text(entry['tracking_uri'])}, but tracking.uri is "
            f"now {redact_text(target.tracking_uri)}; resume with the same tracking.uri."
        )
    return entry


def _status(client: MlflowClient, run_id: str) -> str | None:
    """The MLflow run's status, or None when the store no longer holds it (deleted)."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    return None if run.info.lifecycle_stage == "deleted" else run.info.status


def _listing(entries: list[dict[str, Any]], kind: Kind) -> str:
    shown = [f"{e.get(NAME_KEYS[kind])} (MLflow run {e.get('mlflow_run_id')})" for e in entries[-5:]]
    return ", ".join(shown) or "nothing"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.with_name(f".{path.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _is_remote(target: TrackingTarget) -> bool:
    return "://" in target.storage_path


def _record_path(target: TrackingTarget, experiment_name: str, kind: Kind) -> Path:
    return Path(target.storage_path) / f"{experiment_name}.{RECORD_FILES[kind]}"

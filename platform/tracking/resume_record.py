"""The record ``knet run --resume`` reads to continue the latest run or search of an experiment.

One small JSON file per experiment and kind next to the Ray results (``<name>.knet_run.json``,
``<name>.knet_search.json``): the Ray run or Tune search name, the MLflow run id and the tracking URI in
its masked form. Resume compares masked forms, so a rotated password still resumes and the file never
holds a secret. Written by temp file + rename: a driver killed mid-write leaves the previous record
whole, never half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from knet_platform.errors import KnetUserError
from knet_platform.redaction import redact_text
from knet_platform.tracking.runs import TrackingTarget

Kind = Literal["run", "search"]
RECORD_FILES: dict[str, str] = {"run": "knet_run.json", "search": "knet_search.json"}


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
    record = {**fields, "tracking_uri": redact_text(target.tracking_uri)}
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    partial.write_text(json.dumps(record, indent=2))
    os.replace(partial, path)


def latest_record(target: TrackingTarget, experiment_name: str, kind: Kind) -> dict[str, Any]:
    """The record of the latest run or search of ``experiment_name``, checked against ``target``."""
    if _is_remote(target):
        raise ResumeMismatchError(
            f"--resume keeps its {kind} record next to the Ray results, which needs a local or mounted "
            f"tracking.storage_path (got {redact_text(target.storage_path)})."
        )
    path = _record_path(target, experiment_name, kind)
    if not path.is_file():
        raise NothingToResumeError(
            f"nothing to resume: no {kind} of {experiment_name!r} was recorded under {target.storage_path} "
            f"({path.name} is missing). Start it without --resume (or set the KNET_HOME or "
            f"tracking.storage_path the {kind} was started with)."
        )
    record = json.loads(path.read_text())
    if redact_text(record["tracking_uri"]) != redact_text(target.tracking_uri):
        raise ResumeMismatchError(
            f"the {kind} to resume logged to {redact_text(record['tracking_uri'])}, but tracking.uri is "
            f"now {redact_text(target.tracking_uri)}; resume with the same tracking.uri."
        )
    return record


def _is_remote(target: TrackingTarget) -> bool:
    return "://" in target.storage_path


def _record_path(target: TrackingTarget, experiment_name: str, kind: Kind) -> Path:
    return Path(target.storage_path) / f"{experiment_name}.{RECORD_FILES[kind]}"

"""The record ``knet run --resume`` reads to continue a search: which Tune search and MLflow parent run
it was, kept next to the Tune results with the tracking URI in its masked form (resume compares masked
forms, as a plain run's record does)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from knet_platform.errors import KnetUserError
from knet_platform.redaction import redact_text
from knet_platform.search_space import SearchSpaceError
from knet_platform.tracking import TrackingTarget

SEARCH_RECORD = "knet_search.json"


class NothingToResumeError(KnetUserError, FileNotFoundError):
    """``--resume`` found no search of this experiment to continue."""


def record_path(target: TrackingTarget, experiment_name: str) -> Path:
    if "://" in target.storage_path:
        raise SearchSpaceError(
            f"--resume keeps its search record next to the Tune results, which needs a local or mounted "
            f"tracking.storage_path (got {redact_text(target.storage_path)})."
        )
    return Path(target.storage_path) / f"{experiment_name}.{SEARCH_RECORD}"


def write_record(
    target: TrackingTarget, experiment_name: str, search_name: str, run_id: str, max_concurrent: int
) -> None:
    if "://" in target.storage_path:
        shown = redact_text(target.storage_path)
        print(f"note: tracking.storage_path {shown} is remote; this search cannot be --resumed")
        return
    path = record_path(target, experiment_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "search_name": search_name,
        "mlflow_run_id": run_id,
        "tracking_uri": redact_text(target.tracking_uri),
        "max_concurrent_trials": max_concurrent,  # what Tune will restore on --resume
    }
    # temp file + rename: a driver killed mid-write leaves the previous record whole, never half of one
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    partial.write_text(json.dumps(record, indent=2))
    os.replace(partial, path)


def latest_record(target: TrackingTarget, experiment_name: str) -> dict[str, Any]:
    path = record_path(target, experiment_name)
    if not path.is_file():
        raise NothingToResumeError(
            f"nothing to resume: no search of {experiment_name!r} was recorded under {target.storage_path} "
            f"({path.name} is missing). Start it without --resume (or set the KNET_HOME or "
            "tracking.storage_path the search was started with)."
        )
    record = json.loads(path.read_text())
    if redact_text(record["tracking_uri"]) != redact_text(target.tracking_uri):
        raise SearchSpaceError(
            f"the search to resume logged to {redact_text(record['tracking_uri'])}, but tracking.uri is now "
            f"{redact_text(target.tracking_uri)}; resume with the same tracking.uri."
        )
    return record

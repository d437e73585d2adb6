"""Where ``knet`` keeps what it makes by default: ``$KNET_HOME`` (default ``<cwd>/.knet``).

The local MLflow store (``mlflow.db``), its artifacts (``mlartifacts/``), Ray Train's results
(``ray_results/``) and the synthetic dataset cache (``data/synthetic``) all live there unless the
experiment names other places, and ``knet predict`` / ``knet eval`` look for models there. In an
experiment YAML, a relative path that starts with ``.knet/`` means "under ``$KNET_HOME``".

A ``ray job submit --working-dir .`` job runs in Ray's temporary unpacked copy of the working
directory, so ``<cwd>/.knet`` would be inside that copy: pass ``KNET_HOME`` to the job
(``--runtime-env-json '{"env_vars": {"KNET_HOME": "'$PWD'/.knet"}}'``); :func:`ray_job_home_warning`
says so when it is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

KNET_HOME_ENV = "KNET_HOME"
HOME_PREFIX = ".knet"
# Set by Ray's job supervisor in the environment of every job entrypoint (the job's driver).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def knet_home(cwd: str | Path | None = None) -> Path:
    """``$KNET_HOME`` made absolute, or ``<cwd>/.knet`` when it is unset or empty."""
    configured = os.environ.get(KNET_HOME_ENV, "").strip()
    if configured:
        return Path(configured).expanduser().resolve()
    return Path(cwd or os.getcwd()).resolve() / HOME_PREFIX


def local_path(value: str | Path, cwd: str | Path | None = None) -> Path:
    """An absolute path for a local path from the experiment: ``~`` expanded, ``.knet/...`` under
    :func:`knet_home`, any other relative path against ``cwd`` (default: the working directory)."""
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    if path.parts and path.parts[0] == HOME_PREFIX:
        return knet_home(cwd).joinpath(*path.parts[1:])
    return (Path(cwd or os.getcwd()) / path).resolve()


def default_tracking_uri(cwd: str | Path | None = None) -> str:
    """The local MLflow store ``knet run`` uses when ``tracking.uri`` is unset."""
    return f"sqlite:///{knet_home(cwd) / 'mlflow.db'}"


def ray_job_home_warning(cwd: str | Path | None = None) -> str | None:
    """A warning when this process is a Ray job's driver running in Ray's temporary copy of the
    working directory with ``KNET_HOME`` unset (results would land in that copy); else None."""
    if os.environ.get(KNET_HOME_ENV, "").strip() or RAY_JOB_ENV not in os.environ:
        return None
    here = Path(cwd or os.getcwd()).resolve()
    if "runtime_resources" not in here.parts:
        return None
    return (
        f"warning: this Ray job runs in Ray's temporary copy of the working directory ({here}), and "
        f"KNET_HOME is not set, so the default MLflow store, artifacts, checkpoints and data cache go to "
        f"{knet_home(here)}, which Ray may delete and which `knet predict` in your checkout will not find. "
        'Submit with --runtime-env-json \'{"env_vars": {"KNET_HOME": "\'$PWD\'/.knet"}}\' (a folder '
        "the cluster's nodes can write), or set tracking.uri and tracking.storage_path."
    )

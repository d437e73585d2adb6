"""A job submitted without ``KNET_HOME`` is warned where its results would go (the README's own job,
with ``KNET_HOME``, is run as written by ``test_readme_cluster.py``).

The cluster is a real ``ray start --head`` on this machine with Ray 2.60's default token auth (the
token under ``~/.ray/``) and the project's venv first on PATH, so the job's entrypoint finds ``knet``. It
runs with ``--block`` and is stopped by signalling the process group it started: ``ray stop`` would stop
every Ray on the machine. The test's ``tmp_path`` plays the user's checkout: ``KNET_HOME`` is its
``.knet``, and ``knet predict`` run there with no tracking option finds the registered model.
"""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from tests.knet_platform.tiny_run import BIN, REPO, cluster_env, free_port, ray_token_headers

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.mlflow]


def _submit(address: str, entrypoint: list[str], *, knet_home: Path | None) -> tuple[str, str]:
    """``ray job submit --working-dir <repo> [--runtime-env-json KNET_HOME] -- ENTRYPOINT``, as the
    README writes it; returns the submission id and everything the command printed."""
    submission_id = f"knet-test-{uuid.uuid4().hex[:8]}"
    command = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO)]
    if knet_home is not None:
        command += ["--runtime-env-json", json.dumps({"env_vars": {"KNET_HOME": str(knet_home)}})]
    command += ["--submission-id", submission_id, "--", *entrypoint]
    submit = subprocess.run(
        command, env=cluster_env(auth="token"), capture_output=True, text=True, timeout=600
    )
    return submission_id, submit.stdout + submit.stderr


def _status(address: str, submission_id: str) -> JobStatus:
    return JobSubmissionClient(address, headers=ray_token_headers()).get_job_status(submission_id)


def test_a_job_without_knet_home_is_warned_where_its_results_would_go(ray_head: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # fails fast after the warning, before any training
    submission_id, output = _submit(
        ray_head,
        ["knet", "run", "experiments/quickstart.yaml", "--set", f"tracking.uri={dead}"],
        knet_home=None,
    )
    assert _status(ray_head, submission_id) == JobStatus.FAILED, output[-5000:]
    # (a failed job's last logs are printed twice: streamed, then in its status message)
    warnings = [line for line in output.splitlines() if line.startswith("warning: this Ray job runs")]
    assert warnings, output[-5000:]
    warning = warnings[0]
    assert "runtime_resources" in warning and "KNET_HOME is not set" in warning
    assert "--runtime-env-json" in warning
    assert f"error: MLflow tracking server {dead} is not reachable" in output

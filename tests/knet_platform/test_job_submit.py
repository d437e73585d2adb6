"""The same YAML on a Ray cluster: ``ray job submit -- knet run experiments/quickstart.yaml`` succeeds.

The cluster is a real ``ray start --head`` on loopback with token auth disabled (development only) and
the project's venv first on PATH, so the job's entrypoint finds ``knet``. It runs with ``--block`` and
is stopped by signalling the process group it started: ``ray stop`` would stop every Ray on the machine.
"""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray.job_submission import JobStatus, JobSubmissionClient

from tests.knet_platform.tiny_run import BIN, REPO, cluster_env, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.mlflow]


def test_ray_job_submit_of_the_quickstart_reaches_succeeded_and_tracks_the_run(
    ray_head: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    submission_id = f"knet-test-{uuid.uuid4().hex[:8]}"
    sets: list[str] = []
    for override in tiny_overrides(tmp_path, epochs=1, workers=1):
        sets += ["--set", override]
    submit = subprocess.run(
        [
            str(BIN / "ray"),
            "job",
            "submit",
            "--address",
            ray_head,
            "--working-dir",
            str(REPO),
            "--submission-id",
            submission_id,
            "--",
            "knet",
            "run",
            "experiments/quickstart.yaml",
            *sets,
        ],  # fmt: skip
        env=cluster_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    status = JobSubmissionClient(ray_head).get_job_status(submission_id)
    assert status == JobStatus.SUCCEEDED, (
        f"{status}\n--- job output ---\n{submit.stdout[-4000:]}{submit.stderr[-2000:]}"
    )
    assert "models:/quickstart@champion" in submit.stdout

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/pq")] == [1]

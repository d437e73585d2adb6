"""Runs survive interruptions: ``--resume`` continues a stopped run, a killed Train worker is replaced."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.knet_platform.tiny_run import (
    descendant_processes,
    latest_registered_epoch,
    load_tiny,
    start_local_ray,
)

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.mlflow]


@pytest.fixture(scope="module")
def local_ray():
    from knet_platform.ray_runtime import stop_ray

    runtime = start_local_ray()
    yield runtime
    stop_ray(runtime)


def _epochs_logged(client: MlflowClient, run_id: str, key: str = "val/pq") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _system_info_written_at(tmp_path: Path, run_id: str) -> float:
    """When the run's system_info.json was written into the local artifact store (its mtime)."""
    (path,) = (tmp_path / "mlartifacts").glob(f"**/{run_id}/artifacts/system_info.json")
    return path.stat().st_mtime


def test_resume_continues_the_same_run_and_from_checkpoint_starts_a_new_one_from_its_weights(
    tmp_path: Path, local_ray, monkeypatch: pytest.MonkeyPatch
) -> None:
    from knet_platform.train.driver import run_experiment

    monkeypatch.chdir(tmp_path)
    first = run_experiment(load_tiny(tmp_path, epochs=1, workers=2))
    resume_started = time.time()
    # a finished run is continued by naming it (a bare resume takes the newest unfinished run)
    resumed = run_experiment(load_tiny(tmp_path, epochs=2, workers=2), resume=True, resume_run=first.run_id)

    assert resumed.run_id == first.run_id and resumed.ray_run_name == first.ray_run_name
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(resumed.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["knet.restored_from_epoch"] == "1"
    assert _epochs_logged(client, resumed.run_id) == [1, 2]
    assert _epochs_logged(client, resumed.run_id, "train/loss") == [1, 2]
    assert resumed.metrics["epoch"] in (1, 2)
    # the new best checkpoint is registered; the first fit's, still the best, would not be again
    assert resumed.registered.version == ("2" if resumed.metrics["epoch"] == 2 else "1")
    assert _system_info_written_at(tmp_path, first.run_id) < resume_started  # logged once per run

    # fine-tuning from the run's uploaded best checkpoint starts a new run (new Ray and MLflow run)
    best_uri = f"runs:/{first.run_id}/checkpoints/best"
    tuned = run_experiment(load_tiny(tmp_path, epochs=1, workers=1), from_checkpoint=best_uri)
    assert tuned.run_id != first.run_id and tuned.ray_run_name != first.ray_run_name
    tuned_run = client.get_run(tuned.run_id)
    assert tuned_run.info.status == "FINISHED" and tuned_run.data.tags["knet.init_weights_from"] == best_uri
    assert "knet.restored_from_epoch" not in tuned_run.data.tags  # weights only: it starts at epoch 1
    assert _epochs_logged(client, tuned.run_id) == [1]


def _train_workers() -> list[int]:
    """PIDs of the Ray Train workers of the Ray this test process started (never anyone else's)."""
    return sorted(pid for pid, cmdline in descendant_processes().items() if "RayTrainWorker" in cmdline)


def test_a_killed_train_worker_is_replaced_and_training_continues_from_the_latest_checkpoint(
    tmp_path: Path, local_ray, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from knet_platform.train.driver import run_experiment

    monkeypatch.chdir(tmp_path)
    epochs = 4
    experiment = load_tiny(tmp_path, epochs=epochs, workers=2)
    killed: list[int] = []
    killed_at: list[float] = []

    def kill_a_worker_once_a_checkpoint_is_registered() -> None:
        # Ray Train's own record, not a checkpoint folder: report() returns before the controller has
        # registered its checkpoint, and a worker group restarted before that starts from scratch
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if any(
                latest_registered_epoch(run) >= 1 for run in (tmp_path / "ray_results").glob("quickstart-*")
            ):
                workers = _train_workers()
                if workers:
                    os.kill(workers[-1], signal.SIGKILL)
                    killed_at.append(time.time())
                    killed.append(workers[-1])
                    return
            time.sleep(0.2)

    watcher = threading.Thread(target=kill_a_worker_once_a_checkpoint_is_registered, daemon=True)
    watcher.start()
    summary = run_experiment(experiment)
    watcher.join(timeout=5)

    assert killed, "no Train worker was killed: the run ended before its second checkpoint appeared"
    assert "restarting the workers from the latest checkpoint (restart 1 of 2)" in capsys.readouterr().err
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    restored = int(run.data.tags["knet.restored_from_epoch"])
    assert 1 <= restored < epochs
    assert _epochs_logged(client, summary.run_id) == list(range(1, epochs + 1))
    assert killed[0] not in _train_workers()
    # the restarted worker group's rank 0 did not log system info a second time
    assert _system_info_written_at(tmp_path, summary.run_id) < killed_at[0]

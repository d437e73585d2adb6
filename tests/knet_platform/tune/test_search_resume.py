"""A search whose driver is killed continues with ``knet run --resume``: finished trials are not re-run.

The driver is a real ``knet run`` process with its own local Ray, searching over two trials; it is
SIGKILLed once Tune has recorded the first trial finished and started the second, as a crash or a lost
laptop lid would.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.knet_platform.tiny_run import (
    BIN,
    QUICKSTART,
    cluster_env,
    kill_driver,
    tiny_overrides,
    tune_overrides,
)

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.mlflow]


def _trial_states(results: Path) -> dict[str, str]:
    """{trial id: status} from the newest experiment state Tune wrote under ``results``.

    Newest by the session timestamp in the file name, not by mtime: a resumed driver copies the
    killed session's state file back to storage at its final sync, giving the stale file a new mtime.
    """
    files = sorted(results.glob("*-search-*/experiment_state-*.json"), key=lambda f: f.name)
    if not files:
        return {}
    try:
        state = json.loads(files[-1].read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # caught mid-write; the next poll reads it whole
    trials = (json.loads(entry[0]) for entry in state["trial_data"])
    return {trial["trial_id"]: trial["status"] for trial in trials}


def _knet_run(tmp_path: Path, overrides: list[str], *extra: str) -> list[str]:
    return [str(BIN / "knet"), "run", str(QUICKSTART), *extra, *(f"--set={o}" for o in overrides)]


def test_a_killed_search_resumes_and_does_not_rerun_its_finished_trials(tmp_path: Path) -> None:
    overrides = [
        *tiny_overrides(tmp_path, epochs=2, workers=1),
        *tune_overrides(lrs=[1e-3, 5e-4], scheduler="fifo"),
    ]
    results = tmp_path / "ray_results"
    with (tmp_path / "first.log").open("w") as log:
        driver = subprocess.Popen(
            _knet_run(tmp_path, overrides),
            cwd=tmp_path,
            env=cluster_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.time() + 480
            while True:
                states = _trial_states(results)
                if "TERMINATED" in states.values() and "RUNNING" in states.values():
                    break
                assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.time() < deadline, f"no trial finished in 480 s: {states}"
                time.sleep(0.5)
        finally:
            kill_driver(driver)
    killed_at = time.time()
    finished = sorted(trial for trial, status in states.items() if status == "TERMINATED")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "quickstart"]

    def children() -> dict[str, object]:
        runs = client.search_runs([experiment.experiment_id], filter_string="tags.`knet.trial_id` != ''")
        return {run.data.tags["knet.trial_id"]: run for run in runs}

    before = children()
    assert all(before[trial].info.status == "FINISHED" for trial in finished)

    resumed = subprocess.run(
        _knet_run(tmp_path, overrides, "--resume"),
        cwd=tmp_path,
        env=cluster_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming search" in resumed.stdout

    assert set(_trial_states(results).values()) == {"TERMINATED"} and len(_trial_states(results)) == 2
    after = children()
    assert sorted(after) == sorted(_trial_states(results))  # one child run per trial, none doubled
    for trial in finished:  # not re-run: same MLflow run, no new training output, each epoch once
        assert after[trial].info.run_id == before[trial].info.run_id
        assert after[trial].info.start_time == before[trial].info.start_time
        (train_run,) = results.glob(f"*-search-*-{trial}")  # the trial's Ray Train run folder
        assert all(f.stat().st_mtime < killed_at for f in train_run.rglob("*") if f.is_file())
        history = client.get_metric_history(after[trial].info.run_id, "train/loss")
        assert sorted(m.step for m in history) == [1, 2]
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`knet.search` != ''")
    (parent,) = [run for run in parents if "mlflow.parentRunId" not in run.data.tags]
    assert parent.info.status == "FINISHED" and parent.data.tags["knet.best_trial"] in after
    champion = client.get_model_version_by_alias("quickstart", "champion")
    assert champion.run_id == after[parent.data.tags["knet.best_trial"]].info.run_id

"""A ``knet run`` whose driver is killed mid-run continues with ``--resume`` from its last checkpoint.

The driver is a real ``knet run`` process with its own local Ray (so this module starts no Ray of its
own); it is SIGKILLed once Ray Train has registered a checkpoint, as a crash or a closed laptop lid
would. Ray Train's own record of registered checkpoints (``checkpoint_manager_snapshot.json``) says
which epoch the resume must start from.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from knet_platform.train.checkpoints import STATE_FILE, load_checkpoint
from mlflow.tracking import MlflowClient

from tests.knet_platform.tiny_run import (
    BIN,
    QUICKSTART,
    cluster_env,
    kill_driver,
    latest_registered_epoch,
    tiny_overrides,
)

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.mlflow]

EPOCHS = 3


def _knet_run(overrides: list[str], *extra: str) -> list[str]:
    return [str(BIN / "knet"), "run", str(QUICKSTART), *extra, *(f"--set={o}" for o in overrides)]


def _epoch_history(client: MlflowClient, run_id: str) -> dict[int, int]:
    """{epoch: timestamp in ms} of the run's val/pq, failing if an epoch was logged twice."""
    history = client.get_metric_history(run_id, "val/pq")
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)), f"an epoch was logged twice: {sorted(steps)}"
    return {m.step: m.timestamp for m in history}


def test_a_killed_run_resumes_in_the_same_mlflow_run_from_its_last_checkpoint_and_registers_a_model(
    tmp_path: Path,
) -> None:
    # every checkpoint kept (not just the best 2), so the test can look at each epoch's folder
    overrides = [*tiny_overrides(tmp_path, epochs=EPOCHS, workers=1), "train.keep_checkpoints=10"]
    results = tmp_path / "ray_results"
    record = results / "quickstart.knet_run.json"  # written by `knet run` before training starts
    with (tmp_path / "first.log").open("w") as log:
        driver = subprocess.Popen(
            _knet_run(overrides),
            cwd=tmp_path,
            env=cluster_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.time() + 480
            while not (record.is_file() and latest_registered_epoch(results / _run_name(record)) >= 1):
                assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.time() < deadline, "no checkpoint was registered in 480 s"
                time.sleep(0.2)
        finally:
            kill_driver(driver)
    killed_at_ms = time.time() * 1000
    run_folder = results / _run_name(record)
    resume_epoch = latest_registered_epoch(run_folder)  # what Ray will hand the resumed workers
    assert 1 <= resume_epoch < EPOCHS, f"the run got to epoch {resume_epoch} of {EPOCHS} before the kill"
    run_id = json.loads(record.read_text())["mlflow_run_id"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody was left to end it
    finished_before = _checkpoint_mtimes(run_folder)
    # Ray registers a checkpoint some time after the worker reported it, so the killed run may have
    # logged an epoch or two past resume_epoch: those stay as they are, the rest come from the resume.
    logged_before = _epoch_history(client, run_id)
    assert set(range(1, resume_epoch + 1)) <= set(logged_before)

    # The next epoch's folder as a kill during its upload leaves it: a cut-short state.pt. Ray never
    # registered it, so the resume must neither start from it nor keep it.
    partial = run_folder / f"checkpoint_epoch_{resume_epoch + 1:04d}"
    partial.mkdir(exist_ok=True)
    complete = (run_folder / f"checkpoint_epoch_{resume_epoch:04d}" / STATE_FILE).read_bytes()
    (partial / STATE_FILE).write_bytes(complete[: len(complete) // 3])

    resumed = subprocess.run(
        _knet_run(overrides, "--resume"),
        cwd=tmp_path,
        env=cluster_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-4000:]
    assert f"resuming Ray run {run_folder.name} (MLflow run {run_id})" in output
    assert f"resuming at epoch {resume_epoch + 1} (step {3 * resume_epoch})" in output
    trained = sorted({int(n) for n in re.findall(rf"\[epoch (\d+)/{EPOCHS}\]", output)})
    assert trained and trained[0] == resume_epoch + 1, f"the resumed driver trained epochs {trained}"

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["knet.restored_from_epoch"] == str(resume_epoch)
    logged = _epoch_history(client, run_id)
    assert sorted(logged) == list(range(1, EPOCHS + 1))  # every epoch once, in the same run
    assert all(logged[epoch] == logged_before[epoch] < killed_at_ms for epoch in logged_before)
    assert all(logged[epoch] > killed_at_ms for epoch in set(logged) - set(logged_before))
    # the finished epochs' checkpoints were not written again; the later ones are complete
    after = _checkpoint_mtimes(run_folder)
    assert all(after[epoch] == finished_before[epoch] for epoch in range(1, resume_epoch + 1))
    assert sorted(after) == list(range(1, EPOCHS + 1))
    assert load_checkpoint(partial).epoch == resume_epoch + 1
    assert latest_registered_epoch(run_folder) == EPOCHS

    # the resumed fit ends like any run: the best checkpoint uploaded (it says which epoch it is) and
    # its model registered from this run
    best_epoch = int(run.data.tags["checkpoint.best.epoch"])
    best_metadata = json.loads(
        Path(client.download_artifacts(run_id, "checkpoints/best/metadata.json", str(tmp_path))).read_text()
    )
    assert best_metadata["epoch"] == best_epoch
    assert best_metadata["score"]["value"] == pytest.approx(float(run.data.tags["checkpoint.best.val/pq"]))
    champion = client.get_model_version_by_alias("quickstart", "champion")
    assert champion.run_id == run_id
    assert float(champion.tags["knet.metric_value"]) == pytest.approx(best_metadata["score"]["value"])

    # every recorded run finished: a bare --resume has nothing to continue (it used to re-open the
    # finished run and register its checkpoint again as a duplicate version) ...
    again = subprocess.run(
        _knet_run(overrides, "--resume"), cwd=tmp_path, env=cluster_env(), capture_output=True, text=True
    )
    assert again.returncode == 2, again.stderr[-3000:]
    assert again.stderr.startswith("error: nothing to resume: every recorded run of 'quickstart' finished")
    # ... and naming the finished run re-opens it without registering its checkpoint a second time
    versions = len(client.search_model_versions("name = 'quickstart'"))
    named = subprocess.run(
        _knet_run(overrides, "--resume", run_id),
        cwd=tmp_path,
        env=cluster_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert named.returncode == 0, (named.stdout + named.stderr)[-4000:]
    assert f"checkpoint already registered as models:/quickstart/{champion.version}" in named.stdout
    assert len(client.search_model_versions("name = 'quickstart'")) == versions
    assert client.get_run(run_id).info.status == "FINISHED"


def _run_name(record: Path) -> str:
    return json.loads(record.read_text())["ray_run_name"]


def _checkpoint_mtimes(run_folder: Path) -> dict[int, float]:
    """{epoch: newest mtime of any file in its checkpoint folder}."""
    mtimes = {}
    for folder in run_folder.glob("checkpoint_epoch_*"):
        files = [f.stat().st_mtime_ns for f in folder.rglob("*") if f.is_file()]
        if files:
            mtimes[int(folder.name.rsplit("_", 1)[1])] = max(files)
    return mtimes

"""Which run ``--resume`` continues: the newest one that did not finish, or the one named; every run
started stays recorded (a later run never hides an earlier failed one)."""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest
from knet_platform.tracking.lifecycle import tracked_run
from knet_platform.tracking.resume_record import NothingToResumeError, select_record
from knet_platform.tracking.runs import (
    TrackingTarget,
    check_tracking_reachable,
    ensure_experiment,
    resolve_tracking,
)

from tests.knet_platform.tiny_run import load_tiny

pytestmark = pytest.mark.mlflow


@pytest.fixture
def store(tmp_path: Path):
    experiment = load_tiny(tmp_path)
    target = resolve_tracking(experiment)
    check_tracking_reachable(target.tracking_uri)
    ensure_experiment(target)
    return experiment, target


def _start(experiment, target: TrackingTarget, outcome: str) -> str:
    """A recorded run of ``experiment`` that ends ``outcome``: "finished", "failed" or "running"."""
    if outcome == "running":  # a killed driver: the run is never ended
        context = tracked_run(experiment, target, "run")
        return context.__enter__().run_id
    try:
        with tracked_run(experiment, target, "run") as run:
            if outcome == "failed":
                raise RuntimeError("the worker failed")
    except RuntimeError:
        pass
    return run.run_id


def test_resume_picks_the_newest_unfinished_run_not_a_later_finished_one(store) -> None:
    experiment, target = store
    failed = _start(experiment, target, "failed")
    _start(experiment, target, "finished")  # last writer: it used to hide the failed run
    assert select_record(target, experiment.name, "run")["mlflow_run_id"] == failed
    killed = _start(experiment, target, "running")
    _start(experiment, target, "finished")
    assert select_record(target, experiment.name, "run")["mlflow_run_id"] == killed


def test_resume_run_picks_the_run_named_by_its_mlflow_id_or_ray_name_finished_or_not(store) -> None:
    experiment, target = store
    first = _start(experiment, target, "finished")
    _start(experiment, target, "failed")
    record = select_record(target, experiment.name, "run", first)
    assert record["mlflow_run_id"] == first
    assert select_record(target, experiment.name, "run", record["ray_run_name"])["mlflow_run_id"] == first
    with pytest.raises(NothingToResumeError, match=r"--resume nope: no run of 'quickstart' with that MLflow"):
        select_record(target, experiment.name, "run", "nope")


def test_when_every_run_finished_there_is_nothing_to_resume_and_the_error_names_the_newest(store) -> None:
    experiment, target = store
    _start(experiment, target, "finished")
    newest = _start(experiment, target, "finished")
    with pytest.raises(NothingToResumeError, match="every recorded run of 'quickstart' finished") as error:
        select_record(target, experiment.name, "run")
    assert newest in str(error.value) and "--resume RUN_ID" in str(error.value)


def test_a_record_of_the_old_single_run_form_still_resumes(store) -> None:
    experiment, target = store
    run_id = _start(experiment, target, "failed")
    path = Path(target.storage_path) / f"{experiment.name}.knet_run.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in record.items() if k != "runs"}))
    assert select_record(target, experiment.name, "run")["mlflow_run_id"] == run_id


def _record_many(args: tuple[str, int, float]) -> None:
    """Wait for the common start time, then record 25 runs as fast as possible."""
    import time

    from knet_platform.tracking.resume_record import write_record

    storage, worker, start = args
    time.sleep(max(0.0, start - time.time()))
    target = TrackingTarget(
        tracking_uri="sqlite:///unused.db", artifact_location=None, experiment_name="together",
        registered_model="together", alias="champion", log_checkpoints="best", storage_path=storage,
    )  # fmt: skip
    for index in range(worker * 25, worker * 25 + 25):
        write_record(target, "together", "run", {"ray_run_name": f"run-{index}", "mlflow_run_id": str(index)})


def test_runs_recorded_at_the_same_time_by_several_processes_are_all_kept(tmp_path: Path) -> None:
    start = time.time() + 15  # every process imported and waiting (spawn re-imports the platform)
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_record_many, [(str(tmp_path), worker, start) for worker in range(4)])
    runs = json.loads((tmp_path / "together.knet_run.json").read_text())["runs"]
    assert sorted(int(run["mlflow_run_id"]) for run in runs) == list(range(100))  # unlocked: 3 of 4 failed

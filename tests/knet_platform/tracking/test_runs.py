"""MLflow tracking: resolved locations, reachability, what rank 0 logs, that no secret reaches MLflow,
and a run against a real server."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from knet_platform.tracking.runs import (
    NONFINITE_TAG,
    ArtifactLocationMismatchError,
    RunLogger,
    TrackingUnreachableError,
    create_run,
    ensure_experiment,
    log_experiment,
    resolve_tracking,
)

from tests.knet_platform.tiny_run import free_port, load_tiny

SECRETS = ("hunter2", "abc123", "k-42")
SECRET_URI = "https://alice:hunter2@mlflow.example.com/?token=abc123"


def test_unset_tracking_locations_default_to_absolute_paths_under_dot_knet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KNET_HOME", raising=False)
    experiment = load_tiny(tmp_path)
    experiment = experiment.with_overrides(
        {"tracking.uri": None, "tracking.artifact_location": None, "tracking.storage_path": None}
    )
    target = resolve_tracking(experiment, cwd=tmp_path)
    base = tmp_path.resolve() / ".knet"
    assert target.tracking_uri == f"sqlite:///{base / 'mlflow.db'}"
    assert target.artifact_location == (base / "mlartifacts").as_uri()
    assert target.storage_path == str(base / "ray_results")
    assert target.registered_model == experiment.name and target.experiment_name == experiment.name


def test_knet_home_moves_every_default_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KNET_HOME", str(tmp_path / "home"))
    experiment = load_tiny(tmp_path).with_overrides(
        {"tracking.uri": None, "tracking.artifact_location": None, "tracking.storage_path": None}
    )
    target = resolve_tracking(experiment, cwd=tmp_path / "elsewhere")
    home = tmp_path / "home"
    assert target.tracking_uri == f"sqlite:///{home / 'mlflow.db'}"
    assert target.artifact_location == (home / "mlartifacts").as_uri()
    assert target.storage_path == str(home / "ray_results")
    assert "sqlite:///" + str(home / "mlflow.db") in target.ui_command()


def test_relative_tracking_locations_become_absolute_and_named_stores_stay_as_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    experiment = load_tiny(tmp_path).with_overrides(
        {"tracking.uri": "sqlite:///runs/mlflow.db", "tracking.artifact_location": "./arts"}
    )
    target = resolve_tracking(experiment)
    assert target.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'runs' / 'mlflow.db'}"
    assert target.artifact_location == (tmp_path.resolve() / "arts").as_uri()
    named = resolve_tracking(experiment.with_overrides({"tracking.uri": "databricks"}))
    assert named.tracking_uri == "databricks"


def test_http_tracking_leaves_the_artifact_location_to_the_server(tmp_path: Path) -> None:
    experiment = load_tiny(tmp_path, tracking_uri="http://127.0.0.1:5999")
    target = resolve_tracking(experiment, cwd=tmp_path)
    assert target.tracking_uri == "http://127.0.0.1:5999" and target.artifact_location is None
    assert target.ui_command() == "open http://127.0.0.1:5999"


@pytest.mark.mlflow
def test_dead_tracking_server_fails_before_ray_starts_naming_the_uri_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from knet_platform.train.driver import run_experiment

    assert not ray.is_initialized()
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.perf_counter()
    with pytest.raises(TrackingUnreachableError) as failure:
        run_experiment(load_tiny(tmp_path, tracking_uri=uri))
    message = str(failure.value)
    assert uri in message and "mlflow server --host 127.0.0.1" in message and "tracking.uri" in message
    assert not ray.is_initialized()
    assert time.perf_counter() - started < 10


@pytest.mark.mlflow
def test_non_finite_metrics_are_logged_warned_about_once_and_listed_in_a_tag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlflow.tracking import MlflowClient

    target = resolve_tracking(load_tiny(tmp_path), cwd=tmp_path)
    run_id = create_run(target, "nan")
    logger = RunLogger(target.tracking_uri, run_id)
    logger.log_epoch({"val/pq": math.nan, "train/loss": 2.0}, 1)
    logger.log_epoch({"val/pq": math.nan, "train/loss": math.inf}, 2)
    printed = capsys.readouterr().out
    assert printed.count("warning: val/pq=nan at epoch 1") == 1 and printed.count("val/pq=nan") == 1
    assert "train/loss=inf at epoch 2" in printed
    client = MlflowClient(tracking_uri=target.tracking_uri)
    pq = client.get_metric_history(run_id, "val/pq")
    assert [m.step for m in pq] == [1, 2] and all(math.isnan(m.value) for m in pq)
    assert client.get_run(run_id).data.tags[NONFINITE_TAG] == "train/loss,val/pq"
    with pytest.raises(TypeError, match="metric 'note' at step 3 is 'x'"):
        logger.log_step({"note": "x"}, 3)  # not a number: an error, not a silent drop


@pytest.mark.mlflow
def test_a_changed_artifact_location_of_an_existing_experiment_is_refused_naming_both(tmp_path: Path) -> None:
    experiment = load_tiny(tmp_path)
    target = resolve_tracking(experiment, cwd=tmp_path)
    first = ensure_experiment(target)
    assert ensure_experiment(target) == first
    moved = resolve_tracking(experiment.with_overrides({"tracking.artifact_location": str(tmp_path / "new")}))
    with pytest.raises(ArtifactLocationMismatchError) as refused:
        ensure_experiment(moved)
    message = str(refused.value)
    assert target.artifact_location in message and (tmp_path / "new").as_uri() in message


@pytest.mark.mlflow
def test_params_yaml_and_tags_reach_mlflow_with_their_secrets_masked(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    # the experiment's own tracking.uri is only logged here; the run goes to a local store
    experiment = load_tiny(tmp_path).with_overrides(
        {"tracking.uri": SECRET_URI, "scaling.resources_per_worker": {"CPU": 1, "api_key": 0, "my_token": 1}}
    )
    target = resolve_tracking(load_tiny(tmp_path), cwd=tmp_path)
    run_id = create_run(target, "secrets", tags={"source": SECRET_URI})
    log_experiment(target.tracking_uri, run_id, experiment)
    logger = RunLogger(target.tracking_uri, run_id)
    logger.set_tag("knet.init_weights_from", "https://bob:k-42@host/ckpt")
    logger.tag_checkpoint("best", f"{SECRET_URI}&x=1", epoch=1, metric="val/pq", value=1.0)

    client = MlflowClient(tracking_uri=target.tracking_uri)
    run = client.get_run(run_id)
    logged_yaml = Path(client.download_artifacts(run_id, "experiment.yaml", str(tmp_path))).read_text()
    for text in (json.dumps(run.data.params), json.dumps(run.data.tags), logged_yaml):
        assert not [secret for secret in SECRETS if secret in text], text
    assert run.data.params["tracking.uri"] == "https://***@mlflow.example.com/?token=***"
    assert run.data.params["scaling.resources_per_worker.my_token"] == "***"
    assert run.data.tags["knet.init_weights_from"] == "https://***@host/ckpt"


@pytest.mark.mlflow
def test_restarted_logger_skips_epochs_the_run_already_has(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    target = resolve_tracking(load_tiny(tmp_path), cwd=tmp_path)
    run_id = create_run(target, "epochs")
    first = RunLogger(target.tracking_uri, run_id)
    assert first.log_epoch({"train/loss": 3.0}, 1) and first.log_epoch({"train/loss": 2.0}, 2)
    restarted = RunLogger(target.tracking_uri, run_id)  # e.g. a worker group restored from epoch 1
    assert restarted.log_epoch({"train/loss": 2.5}, 2) is False
    assert restarted.log_epoch({"train/loss": 1.0}, 3) is True
    history = MlflowClient(tracking_uri=target.tracking_uri).get_metric_history(run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 3.0), (2, 2.0), (3, 1.0)]


@pytest.mark.mlflow
def test_resumed_run_keeps_first_param_values_and_tags_the_changed_ones(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    experiment = load_tiny(tmp_path, epochs=1)
    target = resolve_tracking(experiment, cwd=tmp_path)
    run_id = create_run(target, "params")
    log_experiment(target.tracking_uri, run_id, experiment)
    log_experiment(target.tracking_uri, run_id, experiment.with_overrides({"train.epochs": 2}))
    run = MlflowClient(tracking_uri=target.tracking_uri).get_run(run_id)
    assert run.data.params["train.epochs"] == "1"
    assert run.data.tags["resume.changed.train.epochs"] == "2"


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.mlflow
def test_run_tracked_by_a_real_mlflow_server_proxies_artifacts_registers_and_stores_no_secret(
    tmp_path: Path, mlflow_server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tracking URI carries credentials (the server ignores them): they are used to connect, and
    appear nowhere in the server's database and artifacts (params, tags, the logged YAML, the uploaded
    checkpoint, system info, the model), in Ray's checkpoints or in what is printed."""
    from knet_platform.train.driver import run_experiment
    from mlflow.tracking import MlflowClient

    plain_uri, artifacts_destination = mlflow_server
    uri = plain_uri.replace("http://", "http://alice:hunter2@")
    monkeypatch.chdir(tmp_path)
    summary = run_experiment(load_tiny(tmp_path, epochs=1, workers=1, tracking_uri=uri))
    client = MlflowClient(tracking_uri=plain_uri, registry_uri=plain_uri)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert [m.step for m in client.get_metric_history(summary.run_id, "val/pq")] == [1]
    assert list(artifacts_destination.rglob("state.pt")), (
        "the best checkpoint was not uploaded through the server"
    )
    assert list(artifacts_destination.rglob("MLmodel")), "the model was not uploaded through the server"
    assert not (tmp_path / "mlartifacts").exists() and not (tmp_path / ".knet" / "mlartifacts").exists()
    version = client.get_model_version_by_alias(summary.registered.name, "champion")
    assert str(version.version) == summary.registered.version

    assert run.data.params["tracking.uri"] == plain_uri.replace("http://", "http://***@")
    uploaded = client.download_artifacts(summary.run_id, "checkpoints/best/model", str(tmp_path / "dl"))
    assert (Path(uploaded) / "weights.pt").is_file()  # the best checkpoint carries its model bundle
    system = json.loads(
        Path(client.download_artifacts(summary.run_id, "system_info.json", str(tmp_path / "dl"))).read_text()
    )
    assert system["world_size"] == 1 and system["logged_by"] == "rank 0 of the Ray Train workers"
    leaks = [
        str(path)
        for path in tmp_path.rglob("*")  # the server's sqlite files and artifacts, Ray's checkpoints
        if path.is_file() and b"hunter2" in path.read_bytes()
    ]
    assert not leaks, f"the tracking password was written to {leaks}"
    printed = capsys.readouterr().out + summary.render() + summary.mlflow_ui_command
    assert not [line for line in printed.splitlines() if "hunter2" in line]


# One `knet run`'s first MLflow calls, started in several processes at once on one fresh sqlite store.
_FIRST_RUN_ON_A_FRESH_STORE = """
import sys, time
from pathlib import Path
from knet_platform.tracking.runs import TrackingTarget, check_tracking_reachable, create_run, ensure_experiment

uri, artifacts, barrier, index = sys.argv[1:]
target = TrackingTarget(
    tracking_uri=uri, artifact_location=artifacts, experiment_name="together", registered_model="together",
    alias="champion", log_checkpoints="none", storage_path=artifacts,
)
Path(barrier, f"ready-{index}").touch()
while not Path(barrier, "go").exists():  # start every process's first store access at the same moment
    time.sleep(0.001)
check_tracking_reachable(uri)
ensure_experiment(target)
create_run(target, f"run-{index}")
"""


@pytest.mark.slow  # 4 processes importing MLflow: 15-40 s on 2 cores
@pytest.mark.mlflow
def test_runs_started_together_on_a_fresh_sqlite_store_all_succeed_and_leave_it_usable(
    tmp_path: Path,
) -> None:
    """Creating and migrating the store is serialised by a file lock beside it; without the lock the
    processes race through MLflow's migrations and the store is left broken for good."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}"
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    arguments = [uri, (tmp_path / "mlartifacts").as_uri(), str(barrier)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _FIRST_RUN_ON_A_FRESH_STORE, *arguments, str(index)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(4)
    ]
    deadline = time.time() + 120
    while len(list(barrier.glob("ready-*"))) < len(processes):
        assert all(process.poll() is None for process in processes), "a process exited before the start"
        assert time.time() < deadline, "the processes did not get ready in 120 s"
        time.sleep(0.05)
    (barrier / "go").touch()
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]

    client = MlflowClient(tracking_uri=uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "together"]
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(run.info.run_name for run in runs) == [f"run-{index}" for index in range(4)]

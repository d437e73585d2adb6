"""A two-node Ray cluster on this machine, started, used and stopped with ``cluster/local_multinode.sh``
as cluster/README.md writes it (section 2a), in a user's shell: no Ray variable but what the script's
``env`` command exports. A job submitted with ``local_multinode.sh submit`` logs to a real ``mlflow
server`` on loopback, its two Train workers on the two nodes; a run that loses a node ends within the
worker-group start-up timeout saying ``--resume`` continues, and does once a node is added.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.knet_platform.tiny_run import (
    REPO,
    cluster_env,
    descendant_processes,
    latest_registered_epoch,
    tiny_overrides,
    tune_overrides,
)

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.mlflow]

SCRIPT = REPO / "cluster" / "local_multinode.sh"
CLUSTER_DIR = Path(f"/tmp/knet-cluster-{os.getuid()}")  # the script's default
# 16 generated images, not 128: the module's fresh KNET_HOME generates them, every epoch evaluates val
SMALL_SYNTHETIC = "data.synthetic.num_images=16"


def shell(command: str, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def cluster_processes() -> list[int]:
    found = subprocess.run(["pgrep", "-f", f"{CLUSTER_DIR}/(head|worker)"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def ray_list(env: dict[str, str], what: str, *filters: str) -> list[dict]:
    """``ray list WHAT`` of the State API in detail, asked in a shell set up as the guide says
    (``eval "$(local_multinode.sh env)"``)."""
    listed = shell(
        f'eval "$({SCRIPT} env)" && ray list {what} --address http://127.0.0.1:8265 --detail '
        f"{' '.join(filters)} --format json",
        env,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr[-2000:]
    return json.loads(listed.stdout)


def train_worker_nodes(env: dict[str, str]) -> set[str]:
    """The node ids of the job's Ray Train workers."""
    return {actor["node_id"] for actor in ray_list(env, "actors", "--filter class_name=RayTrainWorker")}


def placement_group_states(env: dict[str, str]) -> list[str]:
    """The state of every placement group the cluster knows."""
    return [group["state"] for group in ray_list(env, "placement-groups")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The two nodes, started and stopped by the script; yields the user's environment (KNET_HOME in
    this module's tmp) and the process ids that are not the cluster's, for the stop check."""
    assert not CLUSTER_DIR.exists(), f"{CLUSTER_DIR} holds a cluster already: stop it first"
    env = {**cluster_env(), "KNET_HOME": str(tmp_path_factory.mktemp("home") / ".knet")}
    others_before = set(descendant_processes(1))  # every process of the machine not ours to stop
    start = shell(f"{SCRIPT} start", env)
    try:
        assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:]
        yield env
    finally:
        stop = shell(f"{SCRIPT} stop", env, timeout=120)
    assert stop.returncode == 0, stop.stderr[-2000:]
    assert not cluster_processes() and not CLUSTER_DIR.exists()
    still_there = {pid for pid in others_before if Path(f"/proc/{pid}").exists()}
    assert still_there, "stop must stop the cluster's nodes only"  # e.g. this pytest and its parents


def test_a_job_on_two_local_nodes_puts_one_worker_on_each_and_registers_its_model(
    tmp_path: Path, mlflow_server, cluster: dict[str, str]
) -> None:
    uri, _ = mlflow_server
    env = cluster
    sets = " ".join(
        f"--set '{o}'"
        for o in [
            *tiny_overrides(tmp_path, workers=2, tracking=False),
            f"tracking.uri={uri}",
            SMALL_SYNTHETIC,
        ]
    )
    job = shell(f'eval "$({SCRIPT} env)" && {SCRIPT} submit experiments/quickstart.yaml {sets}', env)
    output = job.stdout + job.stderr
    assert job.returncode == 0, output[-5000:]
    assert "succeeded" in output and "models:/quickstart@champion" in output, output[-3000:]
    assert len(train_worker_nodes(env)) == 2  # one Train worker on each node

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.status == "FINISHED"
    assert client.get_model_version_by_alias("quickstart", "champion").run_id == run.info.run_id


def test_a_search_submitted_as_a_job_succeeds_frees_every_placement_group_and_ends_every_trial_run(
    tmp_path: Path, cluster: dict[str, str]
) -> None:
    # Each trial takes both trainslots (a worker on each node), so the second trial starts only once the
    # first one's placement group is gone; 2 trials of 1 epoch, one after the other.
    overrides = [
        *tiny_overrides(tmp_path, epochs=1, workers=2),
        *tune_overrides(lrs=[1e-3, 5e-4], scheduler="fifo"),
        "scaling.resources_per_worker={CPU: 0.5, trainslot: 1}",
        SMALL_SYNTHETIC,
    ]
    sets = " ".join(f"--set '{o}'" for o in overrides)
    job = shell(f'eval "$({SCRIPT} env)" && {SCRIPT} submit experiments/quickstart.yaml {sets}', cluster, 600)
    output = job.stdout + job.stderr
    assert job.returncode == 0, output[-5000:]
    assert "search finished" in output and "succeeded" in output, output[-3000:]
    # Train's placement-group cleaner asked this cluster's State API, not "the" local Ray it guessed
    # (with another Ray on the machine it found several, and each trial's clean-up stalled or leaked)
    assert "Found multiple active Ray instances" not in output
    assert "Failed to stop PlacementGroupCleaner" not in output

    states = placement_group_states(cluster)
    deadline = time.time() + 30  # a cleaner removes a group within a second or two of its run's end
    while any(state != "REMOVED" for state in states) and time.time() < deadline:
        time.sleep(1)
        states = placement_group_states(cluster)
    assert states and set(states) == {"REMOVED"}, states

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    (parent,) = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and len(runs) == 3
    assert {run.info.status for run in runs} == {"FINISHED"}


def test_a_run_that_loses_a_node_ends_in_bounded_time_and_resumes_once_one_is_added(
    tmp_path: Path, cluster: dict[str, str]
) -> None:
    # Ray Train's start-up timeout, 180 s by default in knet, shortened for the test
    env = {**cluster, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30"}
    sets = " ".join(f"--set '{o}'" for o in [*tiny_overrides(tmp_path, epochs=4, workers=2), SMALL_SYNTHETIC])
    run = (
        f'eval "$({SCRIPT} env)" && knet run experiments/quickstart.yaml '
        f"--set 'scaling.resources_per_worker={{CPU: 1, trainslot: 1}}' {sets}"
    )
    log = tmp_path / "first.log"
    with log.open("w") as out:
        driver = subprocess.Popen(
            ["bash", "-c", run], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    results = tmp_path / "ray_results"
    deadline = time.time() + 480
    while not any(latest_registered_epoch(folder) >= 1 for folder in results.glob("quickstart-*")):
        assert driver.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "no checkpoint was registered in 480 s"
        time.sleep(0.5)
    (raylet,) = [pid for pid in cluster_processes() if "raylet" in Path(f"/proc/{pid}/cmdline").read_text()
                 and f"{CLUSTER_DIR}/worker" in Path(f"/proc/{pid}/cmdline").read_text()]  # fmt: skip
    os.kill(raylet, signal.SIGKILL)  # the worker node is gone
    lost_at = time.time()
    code = driver.wait(timeout=600)
    output = log.read_text()
    assert code == 1, output[-3000:]
    assert time.time() - lost_at < 300, "the lost node was not reported in bounded time"
    last = output.splitlines()[-1]
    assert last.startswith("error: training failed: the cluster could not place the worker group within 30 s")
    assert "`knet run --resume` continues" in last

    assert shell(f"{SCRIPT} add-node", env).returncode == 0
    resumed = shell(f"{run} --resume", env)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (finished,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert finished.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(finished.info.run_id, "val/pq")) == [1, 2, 3, 4]

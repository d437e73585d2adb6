"""A two-node Ray cluster on this machine, started, used and stopped with ``cluster/local_multinode.sh``
as cluster/README.md writes it (section 2a), in a user's shell: no Ray variable but what the script's
``env`` command exports. The job is submitted with ``local_multinode.sh submit`` and logs to a real
``mlflow server`` on loopback; its two Train workers must land on the two nodes.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.knet_platform.tiny_run import BIN, REPO, cluster_env, descendant_processes, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.mlflow]

SCRIPT = REPO / "cluster" / "local_multinode.sh"
CLUSTER_DIR = Path(f"/tmp/knet-cluster-{os.getuid()}")  # the script's default


def shell(command: str, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def cluster_processes() -> list[int]:
    found = subprocess.run(["pgrep", "-f", f"{CLUSTER_DIR}/(head|worker)"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def train_worker_nodes(env: dict[str, str]) -> set[str]:
    """The node ids of the job's Ray Train workers, from the State API (``ray list actors``)."""
    listed = subprocess.run(
        [str(BIN / "ray"), "list", "actors", "--address", "http://127.0.0.1:8265", "--detail",
         "--filter", "class_name=RayTrainWorker", "--format", "json"],
        env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr[-2000:]
    return {actor["node_id"] for actor in json.loads(listed.stdout)}


def test_a_job_on_two_local_nodes_puts_one_worker_on_each_and_registers_its_model(
    tmp_path: Path, mlflow_server
) -> None:
    uri, _ = mlflow_server
    assert not CLUSTER_DIR.exists(), f"{CLUSTER_DIR} holds a cluster already: stop it first"
    env = {**cluster_env(), "KNET_HOME": str(tmp_path / ".knet")}  # where the job keeps its cache
    others_before = set(descendant_processes(1))  # every process of the machine not ours to stop
    start = shell(f"{SCRIPT} start", env)
    try:
        assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:]
        sets = " ".join(
            f"--set '{o}'"
            for o in [*tiny_overrides(tmp_path, workers=2, tracking=False), f"tracking.uri={uri}"]
        )
        job = shell(
            f'eval "$({SCRIPT} env)" && {SCRIPT} submit experiments/quickstart.yaml {sets}',
            env,
        )
        output = job.stdout + job.stderr
        assert job.returncode == 0, output[-5000:]
        assert "succeeded" in output and "models:/quickstart@champion" in output, output[-3000:]
        assert len(train_worker_nodes(env)) == 2  # one Train worker on each node
    finally:
        stop = shell(f"{SCRIPT} stop", env, timeout=120)
    assert stop.returncode == 0, stop.stderr[-2000:]
    assert not cluster_processes() and not CLUSTER_DIR.exists()
    still_there = {pid for pid in others_before if Path(f"/proc/{pid}").exists()}
    assert still_there, "stop must stop the two nodes only"  # e.g. this pytest and its parents

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.status == "FINISHED"
    assert client.get_model_version_by_alias("quickstart", "champion").run_id == run.info.run_id

"""Ray as the platform uses it: whether a run's workers can be placed (refuse, or wait for an
autoscaler), and a local Ray that its own workers talk to even beside another Ray."""

from __future__ import annotations

import os
import socket
import time

import pytest
import ray
from knet_platform.experiment.sections import ScalingConfig
from knet_platform.ray_runtime import (
    CapacityError,
    RayRuntime,
    check_capacity,
    placeable_workers,
    plan_capacity,
    worker_resources,
)

TWO_CPU_NODES = [{"CPU": 2.0, "memory": 1e9}, {"CPU": 2.0, "memory": 1e9}]
GPU_NODE = {"CPU": 8.0, "GPU": 1.0}


def test_a_worker_takes_what_ray_train_reserves_for_it_on_one_node() -> None:
    assert worker_resources({"CPU": 4, "GPU": 0}, use_gpu=False) == {"CPU": 4.0}
    assert worker_resources({"CPU": 1}, use_gpu=True) == {"CPU": 1.0, "GPU": 1.0}
    assert placeable_workers(TWO_CPU_NODES, {"CPU": 1.0}) == 4
    assert placeable_workers(TWO_CPU_NODES, {"CPU": 3.0}) == 0  # 4 CPUs in all, but 2 per node
    assert placeable_workers(TWO_CPU_NODES, {"CPU": 0.75}) == 4  # 2 per node, fractions included
    assert placeable_workers([GPU_NODE, {"CPU": 8.0}], {"CPU": 1.0, "GPU": 1.0}) == 1


def test_an_impossible_request_is_refused_on_a_local_ray_even_when_told_to_wait() -> None:
    scaling = ScalingConfig(num_workers=3, resources_per_worker={"CPU": 1}, wait_for_resources=True)
    with pytest.raises(
        CapacityError,
        match=r"3 workers x \{CPU: 1\}, but this machine's Ray has 1 node\(s\) "
        r"with \{CPU: 2\} in all, room for 2 worker\(s\) \(scaling.wait_for_resources has no effect",
    ):
        plan_capacity([{"CPU": 2.0}], scaling, local=True)
    assert plan_capacity([{"CPU": 2.0}], ScalingConfig(num_workers=2), local=True) is None


def test_a_cluster_refuses_by_default_and_waits_for_its_autoscaler_when_told_to() -> None:
    scaling = ScalingConfig(num_workers=8, use_gpu=True, resources_per_worker={"CPU": 4, "GPU": 1})
    with pytest.raises(
        CapacityError, match=r"if the cluster autoscales, set scaling.wait_for_resources=true"
    ):
        plan_capacity([{"CPU": 4.0}], scaling, local=False)  # a CPU head of an autoscaling GPU cluster
    waiting = ScalingConfig(**{**scaling.__dict__, "wait_for_resources": True})
    pending = plan_capacity([{"CPU": 4.0}], waiting, local=False)
    assert pending.startswith("waiting for resources: scaling asks for 8 workers x {CPU: 4, GPU: 1}")
    assert "room for 0 worker(s)" in pending
    assert plan_capacity([GPU_NODE] * 8, waiting, local=False) is None


def test_check_capacity_refuses_or_announces_the_wait_and_returns_nothing(monkeypatch, capsys) -> None:
    nodes = [{"Alive": True, "Resources": {"CPU": 4.0}}, {"Alive": False, "Resources": {"CPU": 64.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)  # the live nodes only: the dead one holds nothing
    cluster = RayRuntime(address="ray://head:10001", started_here=True, local=False)
    assert check_capacity(ScalingConfig(num_workers=4), cluster) is None
    assert capsys.readouterr().out == ""
    waiting = ScalingConfig(num_workers=8, wait_for_resources=True)
    assert check_capacity(waiting, cluster) is None
    assert capsys.readouterr().out.startswith("waiting for resources: scaling asks for 8 workers")
    local = RayRuntime(address=None, started_here=True, local=True)
    with pytest.raises(CapacityError, match="this machine's Ray has 1 node"):
        check_capacity(waiting, local)


@ray.remote(num_cpus=0)
def _nodes_seen_by_the_state_api() -> list[str]:
    """What Train's placement-group cleaner does inside the cluster: a State API query."""
    from ray.util.state import list_nodes

    return sorted(node.node_id for node in list_nodes())


@pytest.mark.slow
@pytest.mark.ray
def test_workers_query_their_own_cluster_when_another_ray_runs_on_the_machine(ray_head: str) -> None:
    from knet_platform.ray_runtime import API_SERVER_ENV, start_ray, stop_ray

    assert not ray.is_initialized()
    runtime = start_ray(num_cpus=1)
    try:
        assert runtime.started_here
        ours = ray.get_runtime_context().get_node_id()
        # without the variable the query fails: "Found multiple active Ray instances"
        assert ray.get(_nodes_seen_by_the_state_api.remote(), timeout=120) == [ours]
    finally:
        stop_ray(runtime)
    assert API_SERVER_ENV not in os.environ


def test_a_dead_ray_address_is_not_waited_for_when_looking_up_its_dashboard() -> None:
    """A mistyped or dead RAY_ADDRESS: ``ray.init`` says so itself; the lookup before it must not add
    the GCS client's ~35 s wait."""
    from knet_platform.ray_runtime import cluster_api_server

    with socket.socket() as closed:  # a port nobody listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    started = time.perf_counter()
    assert cluster_api_server(f"127.0.0.1:{port}") is None
    assert time.perf_counter() - started < 5

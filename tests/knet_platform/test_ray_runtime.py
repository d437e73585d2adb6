"""A local Ray started by the platform is the one its own workers talk to, even beside another Ray."""

from __future__ import annotations

import os

import pytest
import ray

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@ray.remote(num_cpus=0)
def _nodes_seen_by_the_state_api() -> list[str]:
    """What Train's placement-group cleaner does inside the cluster: a State API query."""
    from ray.util.state import list_nodes

    return sorted(node.node_id for node in list_nodes())


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

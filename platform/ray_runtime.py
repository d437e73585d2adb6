"""Start Ray in-process on a laptop, or connect to a cluster: the same YAML runs in both places.

Connect when ``RAY_ADDRESS`` is set (``ray job submit`` sets it for the job's entrypoint, and users set
it to reach a running cluster); otherwise start a local Ray inside this process with a capped object
store (Ray reserves ~30% of RAM by default, far more than K-Net's small reports need) and no
dashboard. Worker-group start-up is bounded so a run that cannot be scheduled fails instead of waiting
forever.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray

WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
DEFAULT_WORKER_GROUP_START_TIMEOUT_S = "180"  # Ray's own default (60 s) is tight on a busy 2-core machine
DEFAULT_OBJECT_STORE_BYTES = 200_000_000
# Ray's State API clients (Train's placement-group cleaner among them) find "the" local cluster by
# scanning processes and give up when two run on one machine; this variable names ours for them.
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"


@dataclass(frozen=True)
class RayRuntime:
    """How this process reached Ray. started_here: this process called ``ray.init`` (and shuts it down)."""

    address: str | None
    started_here: bool
    num_cpus: float


def start_ray(
    *,
    num_cpus: int | None = None,
    object_store_memory: int = DEFAULT_OBJECT_STORE_BYTES,
    include_dashboard: bool = True,
) -> RayRuntime:
    """Connect to ``RAY_ADDRESS`` when set, else start a local Ray; re-use an already initialised one.

    ``num_cpus``, ``object_store_memory`` and ``include_dashboard`` apply to a local start only (a
    cluster has its own). The local dashboard listens on 127.0.0.1 only; it also serves the State API
    that Ray Train's placement-group cleaner polls (without it the cleaner logs a warning every few
    seconds and Tune trials' placement groups are never freed).
    """
    os.environ.setdefault(WORKER_GROUP_START_TIMEOUT_ENV, DEFAULT_WORKER_GROUP_START_TIMEOUT_S)
    if ray.is_initialized():
        return RayRuntime(address=None, started_here=False, num_cpus=_cluster_cpus())
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        dashboard_port = _dashboard_port()
        if include_dashboard:  # before ray.init, so the raylet and every worker it starts inherit it
            os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{dashboard_port}"
        ray.init(
            address="local",  # not "whatever cluster /tmp/ray last recorded": that one may be dead
            num_cpus=num_cpus,
            object_store_memory=object_store_memory,
            include_dashboard=include_dashboard,
            dashboard_host="127.0.0.1",
            dashboard_port=dashboard_port,
            log_to_driver=True,
        )
    return RayRuntime(address=address, started_here=True, num_cpus=_cluster_cpus())


def stop_ray(runtime: RayRuntime) -> None:
    """Shut Ray down (or disconnect from the cluster) if :func:`start_ray` started it."""
    if runtime.started_here and ray.is_initialized():
        ray.shutdown()
    if runtime.started_here and runtime.address is None:
        os.environ.pop(API_SERVER_ENV, None)


@contextmanager
def ray_session(
    *,
    num_cpus: int | None = None,
    object_store_memory: int = DEFAULT_OBJECT_STORE_BYTES,
    include_dashboard: bool = True,
) -> Iterator[RayRuntime]:
    """``start_ray`` ... ``stop_ray`` around a block."""
    runtime = start_ray(
        num_cpus=num_cpus, object_store_memory=object_store_memory, include_dashboard=include_dashboard
    )
    try:
        yield runtime
    finally:
        stop_ray(runtime)


def check_capacity(num_workers: int, resources_per_worker: dict[str, float]) -> None:
    """Refuse a run whose workers cannot all fit on the cluster (Ray would wait for them until the
    start-up timeout)."""
    available = ray.cluster_resources()
    for resource, amount in resources_per_worker.items():
        needed = amount * num_workers
        if available.get(resource, 0.0) < needed:
            raise RuntimeError(
                f"scaling asks for {num_workers} workers x {amount} {resource} = {needed} {resource}, "
                f"but the Ray cluster has {available.get(resource, 0.0)}. Lower scaling.num_workers or "
                f"scaling.resources_per_worker, or connect to a bigger cluster (RAY_ADDRESS)."
            )


def _dashboard_port() -> int:
    """Ray's usual 8265 when it is free (the URL users know), else any free loopback port."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", 8265))
        except OSError:
            probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0.0))

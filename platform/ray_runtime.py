"""Start Ray in-process on a laptop, or connect to a cluster: the same YAML runs in both places.

Connect when ``RAY_ADDRESS`` is set (``ray job submit`` sets it for the job's entrypoint, and users set
it to reach a running cluster); otherwise start a local Ray inside this process with a capped object
store (Ray reserves ~30% of RAM by default, far more than K-Net's small reports need) and a
dashboard on 127.0.0.1.

Binding: Ray 2.60 rewrites a node IP of 127.0.0.1 (``ray start --node-ip-address 127.0.0.1``,
``ray.init(_node_ip_address="127.0.0.1")``) to the machine's network address and its GCS and raylet
listen on every interface (checked with ``ss -ltn``), so the local Ray is not loopback-only whatever we
pass; what protects it is Ray's token authentication, on by default (keep ``RAY_AUTH_MODE`` unset).

Before training, :func:`check_capacity` compares the request with what the cluster's nodes can place:
Ray Train 2.60 would otherwise retry an unplaceable worker group forever. The per-node rules here
(:func:`worker_resources`, :func:`bundles_on_node`) also size a search's trials
(``search_space.plan_budget``).
"""

from __future__ import annotations

import fcntl
import math
import os
import socket
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import ray
from knet_platform.errors import KnetUserError

if TYPE_CHECKING:
    from knet_platform.experiment.schema import ScalingConfig

WORKER_GROUP_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
DEFAULT_WORKER_GROUP_START_TIMEOUT_S = "180"  # Ray's own default (60 s) is tight on a busy 2-core machine
# How often Train's controller polls its workers (Ray's default 2 s). The controller learns that
# training ended only at its next poll: a run waited 1 s on average (up to 2) after its last epoch
# before its result reached the driver; a poll is one small actor call per worker. The driver's value
# reaches the controller (Train propagates it); a hung worker is still judged by
# RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S, not by this interval.
HEALTH_CHECK_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
DEFAULT_HEALTH_CHECK_INTERVAL_S = "0.5"
DEFAULT_OBJECT_STORE_BYTES = 200_000_000
# Ray's State API clients (Train's placement-group cleaner among them) find "the" local cluster by
# scanning processes and give up when two run on one machine; this variable names ours for them.
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
# Ray Train 2.60 replaces print() in its workers with one that logs through Train's logger and, once
# anything has wrapped sys.stdout, prints as well: every line of the loop (and pycocotools' report,
# which we redirect) reached the driver twice. Off, a worker's print goes to its stdout, streamed once.
PRINT_PATCH_ENV = "RAY_TRAIN_ENABLE_PRINT_PATCH"


class CapacityError(KnetUserError, RuntimeError):
    """The workers a run asks for cannot all be placed on the cluster, and it cannot grow."""


@dataclass(frozen=True)
class RayRuntime:
    """How this process reached Ray.

    started_here: this process called ``ray.init`` (and shuts it down). local: the Ray is one that
    :func:`start_ray` started inside this process (not a cluster at ``RAY_ADDRESS``): it never grows.
    """

    address: str | None
    started_here: bool
    local: bool = True


_local_ray_started = False  # start_ray started the current in-process Ray (not a cluster connection)


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
    global _local_ray_started
    os.environ.setdefault(WORKER_GROUP_START_TIMEOUT_ENV, DEFAULT_WORKER_GROUP_START_TIMEOUT_S)
    os.environ.setdefault(HEALTH_CHECK_INTERVAL_ENV, DEFAULT_HEALTH_CHECK_INTERVAL_S)
    if ray.is_initialized():
        return RayRuntime(address=None, started_here=False, local=_local_ray_started)
    address = os.environ.get("RAY_ADDRESS")
    if address:
        _connect(address)
        _local_ray_started = False
    else:
        _start_local_ray(num_cpus, object_store_memory, include_dashboard)
        _local_ray_started = True
    return RayRuntime(address=address, started_here=True, local=not address)


def _connect(address: str) -> None:
    """``ray.init`` of the cluster at ``address``, its workers told where its State API is.

    The env vars are merged into the job's runtime env (``ray job submit``'s working_dir stays), so
    every actor of the job inherits them, Train's detached placement-group cleaner among them: without
    ``RAY_API_SERVER_ADDRESS`` it looked for "the" local Ray, found several on a machine running more
    than one, and never removed a finished trial's placement group (a search then waited forever).
    """
    env_vars = {PRINT_PATCH_ENV: "0"}
    api_server = os.environ.get(API_SERVER_ENV) or cluster_api_server(address)
    if api_server:
        env_vars[API_SERVER_ENV] = api_server
    ray.init(address=address, log_to_driver=True, runtime_env={"env_vars": env_vars})


def cluster_api_server(address: str) -> str | None:
    """The dashboard URL (it serves the State API) that the cluster at ``address`` records in its GCS;
    None for a Ray Client address (``ray://``), a cluster without a dashboard, or one not reachable
    (``ray.init`` then says why)."""
    if address.startswith("ray://") or not _reachable(address):
        return None
    from ray._private.ray_constants import DASHBOARD_ADDRESS, KV_NAMESPACE_DASHBOARD
    from ray._private.services import canonicalize_bootstrap_address_or_die
    from ray._raylet import GcsClient

    try:
        gcs = GcsClient(address=canonicalize_bootstrap_address_or_die(address))
        url = gcs.internal_kv_get(DASHBOARD_ADDRESS.encode(), KV_NAMESPACE_DASHBOARD, timeout=10)
    except Exception as problem:  # Ray's own errors (ConnectionError, RpcError): ray.init reports them
        print(f"note: could not read the cluster's dashboard address from {address}: {problem}", flush=True)
        return None
    return f"http://{url.decode()}" if url else None


def _reachable(address: str, timeout: float = 3.0) -> bool:
    """Whether ``host:port`` accepts a TCP connection: a mistyped or dead ``RAY_ADDRESS`` is then left
    to ``ray.init``'s own error at once (the GCS client waited about 35 s before giving up)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return True  # "auto" or a form only Ray understands: let it resolve the address
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def _start_local_ray(num_cpus: int | None, object_store_memory: int, include_dashboard: bool) -> None:
    """``ray.init`` of a new local Ray, its dashboard on a free loopback port (8265 when free).

    Choosing the port and binding it are two steps: two ``knet run`` started together both found 8265
    free and the second one's dashboard failed. Local starts of this user take turns under a lock.
    """
    with _start_lock():
        dashboard_port = _dashboard_port()
        if include_dashboard:  # before ray.init, so the raylet and every worker it starts inherit it
            os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{dashboard_port}"
        os.environ.setdefault(PRINT_PATCH_ENV, "0")  # inherited by the raylet and its workers too
        ray.init(
            address="local",  # not "whatever cluster /tmp/ray last recorded": that one may be dead
            num_cpus=num_cpus,
            object_store_memory=object_store_memory,
            include_dashboard=include_dashboard,
            dashboard_host="127.0.0.1",
            dashboard_port=dashboard_port,
            log_to_driver=True,
        )


@contextmanager
def _start_lock() -> Iterator[None]:
    path = Path(tempfile.gettempdir()) / f"knet-ray-start-{os.getuid()}.lock"
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def stop_ray(runtime: RayRuntime) -> None:
    """Shut Ray down (or disconnect from the cluster) if :func:`start_ray` started it."""
    global _local_ray_started
    if runtime.started_here and ray.is_initialized():
        ray.shutdown()
        _local_ray_started = False
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


def worker_resources(resources_per_worker: Mapping[str, float], use_gpu: bool) -> dict[str, float]:
    """What Ray Train reserves for one worker (on one node): ``resources_per_worker`` without zero
    amounts, plus ``GPU: 1`` when ``use_gpu`` names no GPU amount (as ``ray.train.ScalingConfig`` does
    in Ray 2.60). Plain runs and every trial of a search use it."""
    bundle = {name: float(amount) for name, amount in resources_per_worker.items() if amount > 0}
    if use_gpu:
        bundle.setdefault("GPU", 1.0)
    return bundle


def bundles_on_node(bundle: Mapping[str, float], node: Mapping[str, float]) -> int:
    """How many copies of ``bundle`` (positive amounts) one node with these free resources holds: a
    Ray bundle never spans nodes. The one per-node fitting rule of plain runs and searches."""
    fits = [math.floor(float(node.get(name, 0.0)) / amount + 1e-6) for name, amount in bundle.items()]
    return max(min(fits, default=0), 0)


def placeable_workers(nodes: Sequence[Mapping[str, float]], bundle: Mapping[str, float]) -> int:
    """How many workers of ``bundle`` fit on nodes with these total resources (a worker lives on one
    node; Ray Train spreads workers over nodes as needed)."""
    return sum(bundles_on_node(bundle, node) for node in nodes)


def packed_groups(
    nodes: Sequence[Mapping[str, float]], group: Sequence[Mapping[str, float]], *, limit: int
) -> int:
    """How many whole copies of ``group`` (a search trial: its driver and its workers) first-fit packing
    places on ``nodes``, up to ``limit``; each bundle on one node, empty bundles ignored."""
    free = [dict(node) for node in nodes]
    placed = 0
    while placed < limit:
        trial_free = [dict(node) for node in free]
        for bundle in group:
            if not bundle:
                continue
            node = next((n for n in trial_free if bundles_on_node(bundle, n) >= 1), None)
            if node is None:
                return placed
            for resource, amount in bundle.items():
                node[resource] = node.get(resource, 0.0) - amount
        free = trial_free
        placed += 1
    return placed


def check_capacity(scaling: ScalingConfig, runtime: RayRuntime) -> None:
    """Refuse (:class:`CapacityError`) a request the cluster's live nodes cannot place, or print what
    is pending when the run is to wait for an autoscaler (see :func:`plan_capacity`)."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    pending = plan_capacity(nodes, scaling, local=runtime.local)
    if pending is not None:
        print(pending, flush=True)


def plan_capacity(nodes: list[dict[str, float]], scaling: ScalingConfig, *, local: bool) -> str | None:
    """None when ``nodes`` (each node's total resources) can place every worker now. When they cannot:
    a :class:`CapacityError`, or, with ``scaling.wait_for_resources`` on a cluster that can grow, the
    line saying what is pending (Ray Train then holds its request until the autoscaler adds nodes; Ray
    2.60 has no public API that says whether a cluster autoscales, hence the explicit flag).

    local: the Ray was started by ``knet`` in this process; it never grows, so an impossible request
    is always refused there.
    """
    bundle = worker_resources(scaling.resources_per_worker, scaling.use_gpu)
    placeable = placeable_workers(nodes, bundle)
    if placeable >= scaling.num_workers:
        return None
    totals = {name: sum(node.get(name, 0.0) for node in nodes) for name in bundle}
    asked = f"{scaling.num_workers} workers x {_fmt(bundle)}"
    have = f"{len(nodes)} node(s) with {_fmt(totals)} in all, room for {placeable} worker(s)"
    if local:
        flag = (
            " (scaling.wait_for_resources has no effect on a local Ray)" if scaling.wait_for_resources else ""
        )
        raise CapacityError(
            f"scaling asks for {asked}, but this machine's Ray has {have}{flag}. Lower scaling.num_workers "
            "or scaling.resources_per_worker, or run on a bigger cluster (RAY_ADDRESS or ray job submit)."
        )
    if not scaling.wait_for_resources:
        raise CapacityError(
            f"scaling asks for {asked}, but the Ray cluster has {have}. Lower scaling.num_workers or "
            "scaling.resources_per_worker, or, if the cluster autoscales, set "
            "scaling.wait_for_resources=true to wait for its nodes."
        )
    timeout = os.environ.get(WORKER_GROUP_START_TIMEOUT_ENV, DEFAULT_WORKER_GROUP_START_TIMEOUT_S)
    return (
        f"waiting for resources: scaling asks for {asked}; the cluster has {have} now. "
        "scaling.wait_for_resources is true, so Ray Train holds the request while the autoscaler adds "
        f"nodes (worker start-up is retried every {timeout} s); stop with Ctrl-C or `ray job stop`."
    )


def _dashboard_port() -> int:
    """Ray's usual 8265 when it is free (the URL users know), else any free loopback port."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", 8265))
        except OSError:
            probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _fmt(resources: dict[str, float]) -> str:
    return "{" + ", ".join(f"{name}: {amount:g}" for name, amount in resources.items()) + "}"

"""Fixtures shared by the platform tests: a real ``ray start --head`` cluster on this machine, with Ray
2.60's default token auth (clients here read the token under ``~/.ray/``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.knet_platform.tiny_run import BIN, cluster_env, descendant_processes, free_port, ray_token_headers


@pytest.fixture
def ray_head(tmp_path: Path):
    dashboard_port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="kray-", dir="/tmp")
    command = [
        str(BIN / "ray"), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1", "--port", "0",
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
        "--dashboard-agent-listen-port", str(free_port()),
        "--ray-client-server-port", str(free_port()),
        "--metrics-export-port", str(free_port()),
        "--num-cpus", "2",
        # its own temp dir: the default /tmp/ray would keep a record of this (soon dead) cluster that
        # a later `ray.init()` elsewhere on the machine tries to join; short, for Unix socket paths
        "--temp-dir", temp_dir,
    ]  # fmt: skip
    log = (tmp_path / "ray_head.log").open("w")
    head = subprocess.Popen(
        command, env=cluster_env(auth="token"), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.time() + 120
        while True:
            try:  # token auth covers the dashboard's HTTP API too
                probe = urllib.request.Request(f"{address}/api/version", headers=ray_token_headers())
                with urllib.request.urlopen(probe, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert head.poll() is None, f"ray start exited: {(tmp_path / 'ray_head.log').read_text()[-2000:]}"
            assert time.time() < deadline, "the Ray head's job server did not come up in 120 s"
            time.sleep(1)
        yield address
    finally:
        # `ray start --block` does not stop its node on SIGTERM, so signal the whole process group this
        # fixture created (start_new_session): the head's GCS, raylet, dashboard and workers, nobody else's.
        started = descendant_processes(head.pid)  # Ray workers run in process groups of their own
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=10)
        time.sleep(2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait(timeout=10)
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """A real ``mlflow server`` on loopback (sqlite store, artifacts proxied to a folder): (uri, folder)."""
    port = free_port()
    bin_dir = Path(sys.executable).parent
    server = subprocess.Popen(
        [
            str(bin_dir / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server_artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, "mlflow server exited during start-up"
            assert time.time() < deadline, "mlflow server did not become healthy in 90 s"
            time.sleep(1)
        yield uri, tmp_path / "server_artifacts"
    finally:
        server.terminate()
        server.wait(timeout=30)

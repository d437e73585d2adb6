"""What keeps a run's fixed cost down (benchmarks/multinode.py, cluster/README.md "Fixed cost of a run"):
Train's controller polls often enough to see the end of training at once, registration's slow first
check runs while the workers train, and a Train worker other than rank 0 does not import MLflow."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import knet_platform.ray_runtime as ray_runtime
import pytest
from knet_platform.tracking.registry import pinned_requirements, prepare_registration


@pytest.mark.ray
def test_the_controller_polls_every_half_second_unless_the_user_chose_an_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(ray_runtime.HEALTH_CHECK_INTERVAL_ENV, raising=False)
    runtime = ray_runtime.start_ray(num_cpus=1, include_dashboard=False)  # a real local Ray
    try:
        assert os.environ[ray_runtime.HEALTH_CHECK_INTERVAL_ENV] == "0.5"
        monkeypatch.setenv(ray_runtime.HEALTH_CHECK_INTERVAL_ENV, "3")
        assert not ray_runtime.start_ray().started_here  # the same Ray, joined again
        assert os.environ[ray_runtime.HEALTH_CHECK_INTERVAL_ENV] == "3"
    finally:
        ray_runtime.stop_ray(runtime)


def test_the_interval_reaches_the_controller_through_trains_own_propagation(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    monkeypatch.setenv(ray_runtime.HEALTH_CHECK_INTERVAL_ENV, ray_runtime.DEFAULT_HEALTH_CHECK_INTERVAL_S)
    assert get_env_vars_to_propagate()[ray_runtime.HEALTH_CHECK_INTERVAL_ENV] == "0.5"


def test_registration_is_prepared_in_a_low_priority_thread_that_leaves_the_caller_alone() -> None:
    from mlflow.utils import requirements_utils

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    thread = prepare_registration()
    assert thread.daemon
    thread.join(timeout=120)
    assert not thread.is_alive()
    # MLflow's package map, which log_model's requirement check needs, is built for this process
    assert requirements_utils._MODULES_TO_PACKAGES is not None
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before
    assert all(requirements_utils._check_requirement_satisfied(pin) is None for pin in pinned_requirements())


def test_a_train_worker_imports_mlflow_only_for_rank_0() -> None:
    check = (
        "import sys, knet_platform.train.worker\n"
        "assert 'mlflow' not in sys.modules, sorted(m for m in sys.modules if m.startswith('mlflow'))[:5]"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

"""Shared by the training-platform tests: the quickstart experiment shrunk to seconds per epoch.

Every run writes its MLflow store, artifacts and Ray results under the test's ``tmp_path``; the
synthetic data stays where the quickstart YAML caches it (generated once, then re-used).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from knet_platform.experiment.schema import Experiment, load_experiment

REPO = Path(__file__).absolute().parents[2]
QUICKSTART = REPO / "experiments" / "quickstart.yaml"
BIN = Path(sys.executable).parent  # the venv's ray, knet and mlflow commands
# Ray Train's record of the checkpoints it registered (what a restarted worker group resumes from)
RAY_CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"


def tiny_overrides(
    tmp_path: Path,
    *,
    epochs: int = 1,
    workers: int = 2,
    tracking_uri: str | None = None,
    tracking: bool = True,
) -> list[str]:
    """``--set`` strings: resnet18 with 32 channels, 64-pixel images, 3 steps per epoch, tracking in tmp
    (``tracking=False``: no tracking overrides, so the defaults under ``$KNET_HOME`` apply)."""
    uri = tracking_uri or f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [
        "model.backbone.name=resnet18",
        "model.channels=32",
        "model.num_proposals=8",
        "model.num_stages=1",
        "model.update.feedforward_channels=64",
        "data.transforms.train_short_sides=[64]",
        "data.transforms.max_size=64",
        "data.transforms.crop_size=null",
        "data.transforms.test_short_side=64",
        "data.transforms.test_max_size=64",
        "data.num_workers=0",
        f"train.epochs={epochs}",
        "train.batch_size=2",
        "train.lr=0.0005",
        "train.warmup_iters=3",
        "train.max_steps_per_epoch=3",
        "train.log_every=0",
        f"scaling.num_workers={workers}",
    ]
    if not tracking:
        return overrides
    overrides += [f"tracking.uri={uri}", f"tracking.storage_path={tmp_path / 'ray_results'}"]
    if not uri.startswith("http"):
        overrides.append(f"tracking.artifact_location={tmp_path / 'mlartifacts'}")
    return overrides


def tune_overrides(*, lrs: list[float], max_concurrent: int = 1, scheduler: str = "asha") -> list[str]:
    """A sequential grid over train.lr, ranked by the mean training loss of each epoch.

    train/loss, not val/pq, makes the early stop deterministic: after a tiny first epoch every trial's
    PQ is still 0 (a tie ASHA never stops), while a trial with lr=1e-9 has a visibly higher loss than one
    that learns.
    """
    return [
        f"tune.space={{train.lr: {{grid: [{', '.join(f'{lr:.1e}' for lr in lrs)}]}}}}",  # 1.0e-03: YAML floats
        "tune.metric=train/loss",
        "tune.mode=min",
        f"tune.scheduler.type={scheduler}",
        "tune.scheduler.grace_period=1",
        "tune.scheduler.reduction_factor=2",
        f"tune.max_concurrent_trials={max_concurrent}",
        "tune.trial_driver_cpus=0.25",
        "scaling.resources_per_worker={CPU: 0.75}",
        "train.warmup_iters=0",
        "train.grad_clip=null",
        "train.metric=train/loss",
        "train.mode=min",
    ]


def load_tiny(tmp_path: Path, *extra: str, **kwargs: object) -> Experiment:
    return load_experiment(str(QUICKSTART), [*tiny_overrides(tmp_path, **kwargs), *extra])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cluster_env(*, auth: str | None = None) -> dict[str, str]:
    """The environment of a user's shell with the venv activated: the venv first on PATH, no Ray or
    knet variables (Ray picks its own auth mode, as for a user: a new local Ray turns token auth on),
    KNET_HOME only where a test sets one. ``auth="token"``: what the README tells users to export
    before talking to a ``ray start`` cluster."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE", "KNET_HOME"):
        env.pop(name, None)  # this process's own Ray is not the one the command talks to
    if auth is not None:
        env["RAY_AUTH_MODE"] = auth
    return env


def ray_token_headers() -> dict[str, str]:
    """The HTTP header a client of a token-auth cluster on this machine sends (Ray 2.60 keeps the token
    in ``~/.ray/auth_token``; ``ray start`` re-uses an existing one). Passed explicitly: this process's
    Ray config may have been read before (auth mode unset means disabled for a bare client)."""
    token_path = Path.home() / ".ray" / "auth_token"
    return {"Authorization": f"Bearer {token_path.read_text().strip()}"} if token_path.is_file() else {}


def start_local_ray():
    """A 2-CPU local Ray for one test module (the runner re-uses it instead of starting its own)."""
    from knet_platform.ray_runtime import start_ray

    return start_ray(num_cpus=2)


def descendant_processes(root: int | None = None) -> dict[int, str]:
    """{pid: command line} of every live descendant of ``root`` (default: this process), from /proc.
    Tests use it to signal only processes they started themselves."""
    root = os.getpid() if root is None else root
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            parents[int(stat.parent.name)] = int(fields[1])

    def descends(pid: int) -> bool:
        while pid in parents and pid > 1:
            pid = parents[pid]
            if pid == root:
                return True
        return False

    found = {}
    for pid in parents:
        if descends(pid):
            try:
                found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
    return found


def kill_driver(driver: subprocess.Popen) -> None:
    """Crash a ``knet run`` driver and the local Ray it started, all at one instant, as a lost machine
    would: every process of the tree is frozen (SIGSTOP, repeated until no new child appears), then
    SIGKILLed. Nothing of the killed run can log or write after this returns, so a test can compare
    timestamps with the moment it returned. Only processes descending from ``driver`` are touched."""
    frozen: set[int] = set()
    tree = {driver.pid}
    while tree - frozen:
        for pid in tree - frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        frozen |= tree
        tree = {driver.pid, *descendant_processes(driver.pid)}
    for pid in frozen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    driver.wait(timeout=30)


def latest_registered_epoch(run_folder: Path) -> int:
    """The epoch of the latest checkpoint Ray Train registered for this run (0 when none yet)."""
    try:
        snapshot = json.loads((run_folder / RAY_CHECKPOINT_SNAPSHOT).read_text())
    except (OSError, json.JSONDecodeError):
        return 0  # not written yet, or caught mid-write: the next poll reads it whole
    latest = snapshot.get("latest_checkpoint_result")
    if not latest:
        return 0
    return int(re.fullmatch(r"checkpoint_epoch_(\d+)", latest["checkpoint_dir_name"]).group(1))

"""What a run costs on a Ray cluster: two Ray nodes on this machine (``cluster/local_multinode.sh``).

The same tiny experiment (the quickstart shrunk as in ``small_run.py``) is submitted as a job
twice, as cluster/README.md section 2a does, on an already running cluster. Prints:
1. warm step throughput with 2 workers on 1 node and with 1 worker on each of 2 nodes, and the ratio;
2. the time from ``ray job submit`` to the first training step;
3. the fixed cost of a run (everything but its epochs), split by phase: job set-up (upload, runtime
   env), driver start (imports, checks before Ray), Ray connect, MLflow run, worker group (Train
   controller, worker processes), data + model until the first step, registration (after the last
   epoch), job end. Times come from Ray's timestamped log lines, other log lines stamped on arrival
   and MLflow's records (run start and end, the first step's loss, the last epoch's metrics). The job's
   log stream lags by 1 to 4 s (Ray's log tail sleeps 1 s at every end of file), so the entrypoint's
   line, stamped on arrival, moves up to 4 s from driver start into job set-up; their sum holds.
   Each job's MLflow store is created before its clock starts, as on a cluster in use: a brand-new
   store's tables cost its first run about 2 s more, once.

The cluster gets its own temp dir and ports (it can run beside the test suite's) and is stopped at the
end. The load average before and after is printed: other work on the machine shifts every phase. Run by
hand (about 3 minutes on 2 cores):
    python -m benchmarks.multinode [--steps-per-epoch 6] [--epochs 3] [--log-dir DIR]
--log-dir keeps each job's log, every line prefixed with its arrival in seconds since ``ray job submit``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from mlflow.tracking import MlflowClient

from benchmarks.small_run import BATCH, small_overrides

REPO = Path(__file__).absolute().parents[1]
SCRIPT = REPO / "cluster" / "local_multinode.sh"
GCS_PORT, DASHBOARD_PORT = 6491, 8275  # not the script's defaults: the suite's cluster may be up
# the first log line of each phase's end, in the order they come; Ray's own lines carry a timestamp,
# the others are stamped on arrival (the job's log stream lags by up to a second or two)
MARKS = {
    "driver": re.compile(r"Running entrypoint for job"),
    "connecting": re.compile(r"Connecting to existing Ray cluster"),
    "connected": re.compile(r"Connected to Ray cluster"),
    "worker_group": re.compile(r"Started training worker group"),
}
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


@dataclass
class Job:
    """One submitted job: seconds since ``ray job submit`` of each log mark and MLflow time."""

    wall: float
    marks: dict[str, float]  # log marks, and from MLflow: run_start, first_step, last_epoch, run_end
    steps_per_s: float  # warm (epochs after the first), per worker
    nodes: int
    workers: int = 2


def shell_env(state: Path) -> dict[str, str]:
    """A user's shell with the venv active and this benchmark's cluster named; no Ray variable set."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE"):
        env.pop(name, None)
    env.update(
        KNET_CLUSTER_DIR=str(state), KNET_RAY_PORT=str(GCS_PORT), KNET_DASHBOARD_PORT=str(DASHBOARD_PORT)
    )
    return env


def script(env: dict[str, str], command: str) -> subprocess.CompletedProcess[str]:
    line = f'eval "$({SCRIPT} env)" && {command}'
    return subprocess.run(["bash", "-c", line], cwd=REPO, env=env, capture_output=True, text=True, check=True)


def overrides(workdir: Path, *, epochs: int, steps: int, resources: str) -> list[str]:
    """Every step's loss logged (the first step's time is read from MLflow); 2 workers placed by
    ``resources``."""
    small = small_overrides(workdir, epochs=epochs, steps=steps, workers=2, log_every=1)
    return [*small, f"scaling.resources_per_worker={resources}"]


def submit(
    env: dict[str, str],
    workdir: Path,
    *,
    epochs: int,
    steps: int,
    resources: str,
    log_file: Path | None = None,
) -> Job:
    """``local_multinode.sh submit`` of the tiny experiment; its log lines stamped as they stream."""
    workdir.mkdir(parents=True)
    # the job's MLflow store exists before the clock starts, as on a cluster in use: a brand-new store's
    # tables cost its first run about 2 s more, once (not a cost of every run)
    MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}").search_experiments()
    sets = " ".join(
        f"--set '{o}'" for o in overrides(workdir, epochs=epochs, steps=steps, resources=resources)
    )
    before = train_workers(env)
    line = f'eval "$({SCRIPT} env)" && {SCRIPT} submit experiments/quickstart.yaml {sets}'
    started = time.time()
    process = subprocess.Popen(
        ["bash", "-c", line], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    marks: dict[str, float] = {}
    log: list[str] = []
    for text in process.stdout:
        log.append(f"{time.time() - started:7.2f} {text}")
        for name, pattern in MARKS.items():
            if name not in marks and pattern.search(text):
                marks[name] = stamp(text) - started
    if process.wait() != 0:
        raise RuntimeError("the job failed:\n" + "".join(log[-60:]))
    wall = time.time() - started
    if log_file is not None:
        log_file.write_text("".join(log))
    recorded, rate = mlflow_figures(workdir, epochs)
    marks.update({name: at - started for name, at in recorded.items()})
    nodes = {actor["node_id"] for actor in train_workers(env) if actor["actor_id"] not in before}
    return Job(wall, marks, rate, len(nodes))


def stamp(line: str) -> float:
    """The time a log line was written: its own timestamp (Ray's lines, local time), else now."""
    found = STAMP.match(line)
    return datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if found else time.time()


def train_workers(env: dict[str, str]) -> list[dict]:
    """Every Ray Train worker actor the cluster knows (dead ones too), from the State API."""
    listed = script(
        env,
        f"ray list actors --address http://127.0.0.1:{DASHBOARD_PORT} --detail "
        "--filter class_name=RayTrainWorker --format json",
    )
    found = json.loads(listed.stdout) if listed.stdout.lstrip().startswith("[") else []  # or "No resource"
    return [{"actor_id": a["actor_id"], "node_id": a["node_id"]} for a in found]


def mlflow_figures(workdir: Path, epochs: int) -> tuple[dict[str, float], float]:
    """The run's times (epoch seconds) as MLflow recorded them: start, first step's loss, last epoch's
    metrics, end (after registration); and its warm steps/s per worker (epochs after the first)."""
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    run_id = run.info.run_id
    steps = client.get_metric_history(run_id, "train/step_loss")
    last = [m for m in client.get_metric_history(run_id, "train/loss") if m.step == epochs]
    history = client.get_metric_history(run_id, "train/steps_per_s")
    warm = [m.value for m in history if m.step > 1] or [m.value for m in history]
    times = {
        "run_start": run.info.start_time / 1000,
        "first_step": min(m.timestamp for m in steps) / 1000,
        "last_epoch": last[0].timestamp / 1000,
        "run_end": run.info.end_time / 1000,
    }
    return times, sum(warm) / len(warm)


def phases(job: Job) -> list[tuple[str, float]]:
    """The fixed cost's phases in seconds (the epochs, first step to last epoch, left out)."""
    m = job.marks
    return [
        ("job set-up (upload, runtime env)", m["driver"]),
        ("driver start (imports, checks)", m["connecting"] - m["driver"]),
        ("Ray connect", m["connected"] - m["connecting"]),
        ("MLflow run (+ capacity check)", m["run_start"] - m["connected"]),
        ("worker group (Train controller, workers)", m["worker_group"] - m["run_start"]),
        ("data + model, to the first step", m["first_step"] - m["worker_group"]),
        ("registration (after the last epoch)", m["run_end"] - m["last_epoch"]),
        ("job end (Ray disconnect, job exit)", job.wall - m["run_end"]),
    ]


def report(pack: Job, spread: Job, cluster_start: float, loads: tuple[float, float]) -> None:
    print(f"\ntiny quickstart, batch {BATCH}, 2 workers; cluster start (once): {cluster_start:.1f} s")
    print(f"load average (1 min) before {loads[0]:.1f}, after {loads[1]:.1f}")
    for name, job in (("1 node x 2 workers ", pack), ("2 nodes x 1 worker ", spread)):
        images = job.workers * job.steps_per_s * BATCH
        print(
            f"{name} {job.steps_per_s:5.2f} steps/s per worker, {images:5.1f} images/s (on {job.nodes} node(s))"
        )
    print(f"throughput ratio (2 nodes / 1 node)   {spread.steps_per_s / pack.steps_per_s:.2f}")
    for name, job in (("1 node x 2 workers", pack), ("2 nodes x 1 worker", spread)):
        epochs = job.marks["last_epoch"] - job.marks["first_step"]
        print(
            f"\n{name}: ray job submit -> first step {job.marks['first_step']:.1f} s; wall {job.wall:.1f} s"
        )
        for phase, seconds in phases(job):
            print(f"  {phase:40s} {seconds:6.1f} s")
        print(f"  {'fixed cost (wall - epochs)':40s} {job.wall - epochs:6.1f} s   (epochs: {epochs:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps-per-epoch", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--log-dir", type=Path, help="write each job's log here, every line with its seconds since submit"
    )
    args = parser.parse_args()
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="knet-multinode-") as scratch:
        workdir = Path(scratch)
        env = shell_env(Path(f"/tmp/knet-bench-{os.getuid()}"))
        started = time.time()
        subprocess.run([str(SCRIPT), "start"], env=env, check=True, capture_output=True)
        cluster_start = time.time() - started
        try:
            kwargs = {"epochs": args.epochs, "steps": args.steps_per_epoch}
            logs = {
                name: args.log_dir / f"{name}.log" if args.log_dir else None for name in ("pack", "spread")
            }
            pack = submit(
                env, workdir / "pack", resources="{CPU: 0.5, trainslot: 0.5}", log_file=logs["pack"], **kwargs
            )
            spread = submit(
                env, workdir / "spread", resources="{CPU: 1, trainslot: 1}", log_file=logs["spread"], **kwargs
            )
        finally:
            subprocess.run([str(SCRIPT), "stop"], env=env, check=True, capture_output=True)
    report(pack, spread, cluster_start, (load_before, os.getloadavg()[0]))


if __name__ == "__main__":
    main()

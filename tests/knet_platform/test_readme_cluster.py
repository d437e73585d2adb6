"""The README's "Running on a Ray cluster" commands, run as written in a fresh shell.

Terminal 1 and terminal 2 are the README's two bash blocks, run by ``bash -e`` in a copy of the
checkout with a fresh ``HOME`` (no Ray token yet) and nothing in the environment but ``PATH`` and
``HOME``: no variable the README does not export itself. The only change to what users type: the
quickstart is shrunk with ``--set`` overrides, and the head node is stopped with the Ctrl-C the README
names (SIGINT to terminal 1), which must stop every process it started.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.knet_platform.tiny_run import BIN, REPO, descendant_processes, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.mlflow]


def readme_blocks(section: str) -> list[str]:
    text = (REPO / "README.md").read_text()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", body, flags=re.S)


def checkout_copy(destination: Path) -> Path:
    """The checkout's tracked files as they are now, and its venv, as a user's clone would have them."""
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for name in filter(None, tracked):
        source = REPO / name
        if source.is_symlink():  # knet_platform -> platform: kept a link, as git clones it
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            (destination / name).symlink_to(source.readlink())
        elif source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    (destination / ".venv").symlink_to(BIN.parent)
    return destination


def wait_for_dashboard(token_file: Path, head: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 120
    while True:
        try:
            token = token_file.read_text().strip()
            request = urllib.request.Request(
                "http://127.0.0.1:8265/api/version", headers={"Authorization": f"Bearer {token}"}
            )
            with urllib.request.urlopen(request, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert head.poll() is None, f"terminal 1 ended: {log.read_text()[-3000:]}"
        assert time.time() < deadline, (
            f"the head's dashboard did not answer in 120 s: {log.read_text()[-3000:]}"
        )
        time.sleep(1)


def test_the_readme_cluster_commands_work_as_written_in_a_fresh_shell(tmp_path: Path) -> None:
    terminal_1, terminal_2 = readme_blocks("Running on a Ray cluster")[:2]
    checkout = checkout_copy(tmp_path / "checkout")
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}
    # a user who ran the quickstart first has a token: its local Ray (ray.init) created one. With it,
    # `ray start` turns auth on and a job CLI not told RAY_AUTH_MODE=token fails (issue 11)
    subprocess.run(
        [str(BIN / "ray"), "get-auth-token", "--generate"], check=True, env=env, capture_output=True
    )
    subprocess.run(
        [str(BIN / "knet"), "data", "synth", str(tmp_path / "synth"), "--images", "4"], check=True, env=env
    )
    shutil.copytree(tmp_path / "synth" / "images" / "val", checkout / "images")  # the user's images/
    # the user's own edits to platform/ must run in the job (driver and Train workers), as knet/'s do
    for module, marker in (("cli.py", "shipped cli"), ("train/worker.py", "shipped worker")):
        with (checkout / "platform" / module).open("a") as source:
            source.write(f"\nprint({marker!r}, flush=True)\n")
    # 16 generated images, not 128: the fresh checkout generates them, and the epoch evaluates val
    overrides = [*tiny_overrides(tmp_path, workers=1, tracking=False), "data.synthetic.num_images=16"]
    shrunk = " ".join(f"--set {shlex.quote(o)}" for o in overrides)
    assert "knet run experiments/quickstart.yaml\n" in terminal_2
    terminal_2 = terminal_2.replace(
        "knet run experiments/quickstart.yaml\n", f"knet run experiments/quickstart.yaml {shrunk}\n"
    )

    log = tmp_path / "terminal_1.log"
    with log.open("w") as out:
        head = subprocess.Popen(
            ["bash", "-e", "-c", terminal_1], cwd=checkout, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    started: dict[int, str] = {}
    try:
        wait_for_dashboard(home / ".ray" / "auth_token", head, log)
        started = descendant_processes(head.pid)
        second = subprocess.run(
            ["bash", "-e", "-c", terminal_2],
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        output = second.stdout + second.stderr
        assert second.returncode == 0, output[-5000:]
        assert "Job 'raysubmit_" in output and "succeeded" in output, output[-3000:]
        assert "models:/quickstart@champion" in output
        assert "shipped cli" in output and "shipped worker" in output, output[-3000:]
        overlays = list((checkout / "results" / "overlays").glob("*.png"))
        assert len(overlays) == len(list((checkout / "images").iterdir()))  # the README's predict
        assert "runs in Ray's temporary copy" not in output  # KNET_HOME was given: no warning
        home_of_runs = checkout / ".knet"  # where the README says the run, checkpoints and model are
        assert f"mlflow store     sqlite:///{home_of_runs / 'mlflow.db'}" in output  # the summary says so
        client = MlflowClient(tracking_uri=f"sqlite:///{home_of_runs / 'mlflow.db'}")
        (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/pq")] == [1]
        record = json.loads((home_of_runs / "ray_results" / "quickstart.knet_run.json").read_text())
        assert record["mlflow_run_id"] == run.info.run_id  # what `knet run --resume` reads
        run_folder = home_of_runs / "ray_results" / record["ray_run_name"]
        assert (run_folder / "checkpoint_epoch_0001" / "state.pt").is_file()
        assert list((home_of_runs / "data" / "synthetic").glob("images/val/*.png"))  # the data cache too
    finally:
        os.killpg(head.pid, signal.SIGINT)  # Ctrl-C in terminal 1
        deadline = time.time() + 60
        while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in started):
            time.sleep(1)
        left = [pid for pid in started if Path(f"/proc/{pid}").exists()]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not left, f"Ctrl-C left processes of the head running: {[started[pid][:80] for pid in left]}"

"""Two ``knet run`` of the quickstart started together in a fresh folder, as a user with two terminals
would: one store created once, one dataset generated once, two local Rays with their own dashboards,
two finished runs and two registered versions."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.knet_platform.tiny_run import BIN, QUICKSTART, cluster_env, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.mlflow]

SMALL_SYNTHETIC = "data.synthetic.num_images=16"  # 12 train (3 steps of 2 x 2 workers), 4 val


def test_two_runs_started_together_on_a_fresh_home_both_finish_and_register(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {**cluster_env(), "KNET_HOME": str(home)}
    # 16 generated images, not 128: the fresh home generates them (once), and every epoch evaluates val
    shrunk = [*tiny_overrides(tmp_path, epochs=1, workers=1, tracking=False), SMALL_SYNTHETIC]
    overrides = [f"--set={o}" for o in shrunk]
    logs = [tmp_path / f"run{index}.log" for index in range(2)]
    drivers = []
    for log in logs:
        with log.open("w") as out:
            drivers.append(
                subprocess.Popen(
                    [str(BIN / "knet"), "run", str(QUICKSTART), *overrides],
                    cwd=tmp_path,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    codes = [driver.wait(timeout=600) for driver in drivers]
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], "\n=====\n".join(output[-3000:] for output in outputs)
    dashboards = {
        line.split("dashboard at")[1].split()[0]
        for o in outputs
        for line in o.splitlines()
        if "dashboard at" in line
    }
    assert len(dashboards) == 2, dashboards  # each run its own

    client = MlflowClient(
        tracking_uri=f"sqlite:///{home / 'mlflow.db'}", registry_uri=f"sqlite:///{home / 'mlflow.db'}"
    )
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert sorted(run.info.status for run in runs) == ["FINISHED", "FINISHED"]
    assert len(client.search_model_versions("name = 'quickstart'")) == 2

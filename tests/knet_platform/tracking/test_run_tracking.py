"""What one run leaves in MLflow, and the registered model used through ``knet predict`` / ``knet eval``.

A 2-epoch quickstart (1 worker, 3 steps per epoch) with ``tracking.log_checkpoints=all`` and a loss line
every step: the resolved YAML (secrets masked, logged by the driver), system info (logged once, by
rank 0 of the Train workers), overlays, per-class tables, per-step losses, every checkpoint's storage URI, epoch, ranking
metric and upload; then the champion is pulled by its ``models:/`` URI on the command line.
With ``tracking.log_checkpoints=none`` nothing but the checkpoints' URIs reaches MLflow.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from knet_platform.redaction import redact
from knet_platform.train.datasets import build_datasets
from mlflow.tracking import MlflowClient

from tests.knet_platform.tiny_run import QUICKSTART, load_tiny, start_local_ray, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.mlflow]


@pytest.fixture(scope="module")
def local_ray():
    from knet_platform.ray_runtime import stop_ray

    runtime = start_local_ray()
    yield runtime
    stop_ray(runtime)


def test_a_run_logs_yaml_system_info_overlays_step_losses_and_every_checkpoint_and_its_model_predicts(
    tmp_path: Path, local_ray, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from knet_platform.cli import main
    from knet_platform.train.driver import run_experiment

    monkeypatch.chdir(tmp_path)
    extra = ("tracking.log_checkpoints=all", "train.log_every=1")
    experiment = load_tiny(tmp_path, *extra, epochs=2, workers=1)
    summary = run_experiment(experiment)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(summary.run_id)

    def artifacts(path: str = "") -> set[str]:
        return {item.path for item in client.list_artifacts(summary.run_id, path)}

    assert {"experiment.yaml", "system_info.json", "overlays", "checkpoints"} <= artifacts()
    logged_yaml = yaml.safe_load(
        Path(client.download_artifacts(summary.run_id, "experiment.yaml")).read_text()
    )
    assert logged_yaml == redact(experiment.to_dict())  # equal here: this experiment holds no secret
    system = json.loads(Path(client.download_artifacts(summary.run_id, "system_info.json")).read_text())
    assert {"torch", "ray", "mlflow", "cpu_count", "hostname", "cuda_devices"} <= set(system)
    assert system["logged_by"] == "rank 0 of the Ray Train workers" and system["world_size"] == 1
    assert system["device"] == "cpu"
    assert any(path.startswith("overlays/epoch_002_") for path in artifacts("overlays"))

    steps = sorted(m.step for m in client.get_metric_history(summary.run_id, "train/step_loss"))
    assert steps == [1, 2, 3, 4, 5, 6]  # 3 steps per epoch, global step numbers
    pq = {m.step: m.value for m in client.get_metric_history(summary.run_id, "val/pq")}
    for epoch in (1, 2):
        name = f"epoch_{epoch:04d}"
        assert Path(run.data.tags[f"checkpoint.{name}"]).name == f"checkpoint_{name}"
        assert f"checkpoints/{name}" in artifacts("checkpoints")
        # each checkpoint says, in its tags and in its uploaded metadata.json, its epoch and val/pq
        assert run.data.tags[f"checkpoint.{name}.epoch"] == str(epoch)
        assert float(run.data.tags[f"checkpoint.{name}.val/pq"]) == pytest.approx(pq[epoch])
        metadata = json.loads(
            Path(client.download_artifacts(summary.run_id, f"checkpoints/{name}/metadata.json")).read_text()
        )
        assert metadata["epoch"] == epoch and metadata["global_step"] == 3 * epoch
        assert metadata["score"] == {"metric": "val/pq", "mode": "max", "value": pytest.approx(pq[epoch])}
    # each evaluated epoch's per-class tables, by the dataset's class names; the summary PQ is their mean
    names = set(build_datasets(experiment).categories.names)
    for epoch in (1, 2):
        per_class = json.loads(
            Path(
                client.download_artifacts(summary.run_id, f"eval/per_class_epoch_{epoch:03d}.json")
            ).read_text()
        )
        assert set(per_class) == {"panoptic", "instance", "semantic"}
        assert per_class["panoptic"] and set(per_class["panoptic"]) <= names
        mean_pq = sum(row["pq"] for row in per_class["panoptic"].values()) / len(per_class["panoptic"])
        assert mean_pq == pytest.approx(pq[epoch])
    # with "all" the best one is not uploaded twice: its tags name one of the uploaded epochs and its value
    best_epoch = int(run.data.tags["checkpoint.best.epoch"])
    assert Path(run.data.tags["checkpoint.best"]).name == f"checkpoint_epoch_{best_epoch:04d}"
    assert float(run.data.tags["checkpoint.best.val/pq"]) == pytest.approx(max(pq.values()))
    assert pq[best_epoch] == pytest.approx(max(pq.values()))

    images = tmp_path / "inputs"
    images.mkdir()
    for image in sorted(Path(experiment.data.val.images).iterdir())[:2]:
        shutil.copy(image, images / image.name)
    model = f"models:/{experiment.tracking.registered_model}@champion"
    out = tmp_path / "predicted"
    assert main(["predict", "--model", model, str(images), "--out", str(out), "--tracking-uri", uri]) == 0
    stems = sorted(image.stem for image in images.iterdir())
    assert sorted(p.stem for p in (out / "panoptic").glob("*.png")) == stems
    assert sorted(p.stem for p in (out / "overlays").glob("*.png")) == stems
    assert len(json.loads((out / "panoptic.json").read_text())["annotations"]) == 2

    capsys.readouterr()
    sets = [
        item for override in tiny_overrides(tmp_path, epochs=2, workers=1) for item in ("--set", override)
    ]
    assert main(["eval", "--model", model, "--tracking-uri", uri, str(QUICKSTART), *sets]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0 <= metrics["val/pq"] <= 100 and "val/mask_ap" in metrics and "val/miou" in metrics


def test_with_log_checkpoints_none_only_checkpoint_uris_reach_mlflow_and_the_model_is_still_registered(
    tmp_path: Path, local_ray, monkeypatch: pytest.MonkeyPatch
) -> None:
    from knet_platform.train.driver import run_experiment

    monkeypatch.chdir(tmp_path)
    experiment = load_tiny(tmp_path, "tracking.log_checkpoints=none", epochs=1, workers=1)
    summary = run_experiment(experiment)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(summary.run_id)

    assert run.info.status == "FINISHED"
    assert "checkpoints" not in {item.path for item in client.list_artifacts(summary.run_id)}
    store = tmp_path / "mlartifacts"
    assert list(store.rglob("MLmodel")), "the model was not logged into this artifact store"
    assert not list(store.rglob("state.pt")), (
        "a training checkpoint was uploaded despite log_checkpoints=none"
    )
    # the tags still say where each checkpoint is (Ray's storage) and how it ranks
    stored = Path(run.data.tags["checkpoint.epoch_0001"])
    assert (stored / "state.pt").is_file() and stored.is_relative_to(tmp_path / "ray_results")
    assert Path(run.data.tags["checkpoint.best"]) == stored and run.data.tags["checkpoint.best.epoch"] == "1"
    assert float(run.data.tags["checkpoint.best.val/pq"]) == pytest.approx(summary.metrics["val/pq"])

    champion = client.get_model_version_by_alias(summary.registered.name, "champion")
    assert champion.run_id == summary.run_id and str(champion.version) == summary.registered.version

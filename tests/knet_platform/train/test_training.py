"""Training on Ray Train: the loop's recipe (checkpoints, schedule, parameter groups) and whole runs."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from knet_platform.train.optim import param_groups, warmup_step_factor
from torch import nn

from tests.knet_platform.tiny_run import BIN, load_tiny, start_local_ray


class _TwoPartModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)


def test_warmup_then_step_schedule_matches_the_closed_form() -> None:
    factor = warmup_step_factor(
        warmup_iters=10, warmup_ratio=0.001, lr_steps=[3, 4], lr_gamma=0.1, steps_per_epoch=5
    )
    # step 0: ratio; step 5: halfway 1 - 0.5 * 0.999; from step 10 on: 1 until epoch 3 (step 15)
    expected = {
        0: 0.001,
        5: 0.5005,
        9: 1 - 0.1 * 0.999,
        10: 1.0,
        14: 1.0,
        15: 0.1,
        19: 0.1,
        20: 0.01,
        99: 0.01,
    }
    for step, value in expected.items():
        assert math.isclose(factor(step), value, rel_tol=1e-9), step
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    for _ in range(15):
        optimizer.step()
        scheduler.step()
    assert math.isclose(optimizer.param_groups[0]["lr"], 0.2)


def test_backbone_parameters_train_at_the_lr_multiplier_and_frozen_ones_not_at_all() -> None:
    model = _TwoPartModel()
    groups = {group["name"]: group for group in param_groups(model, lr=1e-4, backbone_lr_mult=0.25)}
    assert groups["backbone"]["lr"] == pytest.approx(2.5e-5) and groups["head"]["lr"] == 1e-4
    assert {id(p) for p in groups["backbone"]["params"]} == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in groups["head"]["params"]} == {id(p) for p in model.head.parameters()}


@pytest.fixture(scope="module")
def local_ray():
    from knet_platform.ray_runtime import stop_ray

    runtime = start_local_ray()
    yield runtime
    stop_ray(runtime)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.mlflow
def test_quickstart_on_two_workers_logs_metrics_and_registers_a_champion_that_predicts(
    tmp_path: Path, local_ray, monkeypatch: pytest.MonkeyPatch
) -> None:
    from knet_platform.tracking.registry import download_model
    from knet_platform.train.driver import run_experiment
    from mlflow.tracking import MlflowClient

    from knet.bundle import load_bundle

    monkeypatch.chdir(tmp_path)
    experiment = load_tiny(tmp_path, epochs=2, workers=2)
    summary = run_experiment(experiment)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = client.get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    pq_history = client.get_metric_history(summary.run_id, "val/pq")
    assert [m.step for m in pq_history] == [1, 2]
    epochs = client.get_metric_history(summary.run_id, "epoch")  # once per epoch, not twice
    assert sorted((m.step, m.value) for m in epochs) == [(1, 1.0), (2, 2.0)]
    # 3 steps per epoch is too few for the loss to fall every time: the loop's bookkeeping is what is
    # checked (every epoch's mean over both workers logged once, finite, at its epoch)
    losses = sorted(client.get_metric_history(summary.run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in losses] == [1, 2] and all(math.isfinite(m.value) and m.value > 0 for m in losses)
    assert run.data.params["train.epochs"] == "2"

    champion = client.get_model_version_by_alias(experiment.name, "champion")
    assert summary.registered.is_champion and str(champion.version) == summary.registered.version
    assert float(champion.tags["knet.metric_value"]) == pytest.approx(summary.metrics["val/pq"])

    bundle = load_bundle(download_model(summary.model_uri, uri, tmp_path / "download"))
    image = np.random.default_rng(0).integers(0, 255, size=(48, 80, 3), dtype=np.uint8)
    (prediction,) = bundle.predict([image])
    assert tuple(prediction.panoptic.segment_map.shape) == (48, 80)

    import mlflow.pyfunc

    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        pyfunc = mlflow.pyfunc.load_model(summary.model_uri)
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    (served,) = pyfunc.predict([image])
    assert np.array_equal(served["panoptic"]["segment_map"], prediction.panoptic.segment_map.numpy())

    # the real command line, as the README shows it, on two val images
    images = tmp_path / "inputs"
    images.mkdir()
    for path in sorted(Path(experiment.data.val.images).iterdir())[:2]:
        shutil.copy(path, images / path.name)
    out = tmp_path / "predicted"
    predict = subprocess.run(
        [str(BIN / "knet"), "predict", "--model", summary.model_uri, str(images), "--out", str(out),
         "--tracking-uri", uri],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert predict.returncode == 0, predict.stderr[-3000:]
    stems = sorted(path.stem for path in images.iterdir())
    assert sorted(p.stem for p in (out / "panoptic").glob("*.png")) == stems
    assert sorted(p.stem for p in (out / "overlays").glob("*.png")) == stems
    written = json.loads((out / "panoptic.json").read_text())
    assert sorted(Path(a["file_name"]).stem for a in written["annotations"]) == stems


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.mlflow
def test_semantic_quickstart_trains_evaluates_miou_and_registers_a_model_that_predicts_label_maps(
    tmp_path: Path, local_ray, monkeypatch: pytest.MonkeyPatch
) -> None:
    from knet_platform.experiment.schema import load_experiment
    from knet_platform.tracking.registry import download_model
    from knet_platform.train.driver import run_experiment
    from mlflow.tracking import MlflowClient

    from knet.bundle import load_bundle
    from tests.knet_platform.tiny_run import REPO, tiny_overrides

    monkeypatch.chdir(tmp_path)
    experiment = load_experiment(
        str(REPO / "experiments" / "quickstart_semantic.yaml"), tiny_overrides(tmp_path, epochs=2, workers=2)
    )
    summary = run_experiment(experiment)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert client.get_run(summary.run_id).info.status == "FINISHED"
    miou = client.get_metric_history(summary.run_id, "val/miou")
    assert [m.step for m in miou] == [1, 2] and all(0 <= m.value <= 100 for m in miou)
    losses = sorted(client.get_metric_history(summary.run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in losses] == [1, 2] and all(math.isfinite(m.value) for m in losses)
    assert summary.registered.is_champion

    bundle = load_bundle(download_model(summary.model_uri, uri, tmp_path / "download"))
    image = np.random.default_rng(0).integers(0, 255, size=(48, 80, 3), dtype=np.uint8)
    (prediction,) = bundle.predict([image])
    assert prediction.panoptic is None and tuple(prediction.semantic.label_map.shape) == (48, 80)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.mlflow
def test_non_finite_loss_fails_the_run_naming_the_step_and_the_loss_terms(
    tmp_path: Path, local_ray, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from knet_platform.errors import RunFailedError
    from knet_platform.train.driver import run_experiment
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    # An absurd learning rate: after one AdamW step the weights are ~1e30 and the next loss overflows.
    experiment = load_tiny(
        tmp_path, "train.lr=1.0e+30", "train.warmup_iters=0", "train.grad_clip=null", epochs=1, workers=1
    )
    with pytest.raises(
        RunFailedError, match=r"worker 0: NonFiniteLossError: non-finite loss at epoch 1, global step \d+"
    ) as failure:
        run_experiment(experiment)
    assert "all terms:" in str(failure.value)
    assert "restarting the workers" not in capsys.readouterr().err  # the same weights give the same NaN
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name(experiment.name).experiment_id])
    assert run.info.status == "FAILED"

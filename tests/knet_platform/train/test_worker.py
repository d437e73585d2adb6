"""The worker loop's steps, run in this process on the tiny quickstart (the Ray calls are at the edges:
set-up, DDP and report; the steps in between are plain PyTorch and are tested here without Ray)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from knet_platform.knet_adapter import build_model, collate_batch
from knet_platform.train import worker
from knet_platform.train.datasets import build_datasets, prepare_data
from knet_platform.train.worker import NonFiniteLossError, WorkerRun
from torch.utils.data import DataLoader

from tests.knet_platform.tiny_run import load_tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> WorkerRun:
    tmp_path = tmp_path_factory.mktemp("worker")
    experiment = load_tiny(
        tmp_path, "data.synthetic.num_images=8", "data.synthetic.cache_dir=" + str(tmp_path)
    )
    prepare_data(experiment)
    return _worker_run(experiment)


def _worker_run(experiment) -> WorkerRun:  # noqa: ANN001
    torch.manual_seed(0)
    datasets = build_datasets(experiment)
    loader = DataLoader(datasets.train, batch_size=2, shuffle=True, collate_fn=collate_batch)
    val_loader = DataLoader(datasets.val, batch_size=2, collate_fn=collate_batch)
    config = experiment.model_config(datasets.categories)
    model = build_model(config)
    device = torch.device("cpu")
    optimizer, scheduler, scaler = worker._optimisation(experiment, model, 2, device, rank=0)
    loop = worker.LoopConfig(experiment=experiment)
    return WorkerRun(
        loop, 0, 1, device, datasets, loader, None, val_loader, torch.Generator(), model, model, config,
        optimizer, scheduler, scaler, steps_per_epoch=2, logger=None,
    )  # fmt: skip


def test_a_train_step_takes_one_optimiser_step_and_returns_the_total_and_every_term(run: WorkerRun) -> None:
    before = [p.detach().clone() for p in run.core.parameters()]
    step = run.global_step
    run.model.train()
    losses = worker._train_step(run, next(iter(run.train_loader)))
    assert run.global_step == step + 1
    terms = {k: v for k, v in losses.items() if k != "loss"}
    assert terms and torch.allclose(losses["loss"], sum(terms.values()))
    changed = [not torch.equal(a, b) for a, b in zip(before, run.core.parameters())]
    assert any(changed)


def test_an_epoch_reports_the_mean_of_each_loss_term_over_its_steps(run: WorkerRun) -> None:
    metrics = worker._train_one_epoch(run)
    assert metrics["epoch"] == run.epoch + 1
    assert {"train/loss", "train/lr", "train/steps_per_s"} <= metrics.keys()
    assert math.isfinite(metrics["train/loss"]) and metrics["train/loss"] > 0


def test_the_mean_over_workers_divides_each_sum_by_the_steps() -> None:
    sums = {
        "loss": torch.tensor(6.0, dtype=torch.float64),
        "loss_dice": torch.tensor(3.0, dtype=torch.float64),
    }
    assert worker._mean_over_workers(sums, 3, torch.device("cpu")) == {
        "train/loss": 2.0,
        "train/loss_dice": 1.0,
    }


def test_a_non_finite_loss_names_the_epoch_the_step_and_the_bad_term() -> None:
    losses = {"loss_cls": torch.tensor(1.0), "loss_mask": torch.tensor(math.nan)}
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, global step 7: .*\['loss_mask'\]"):
        worker._check_finite(sum(losses.values()), losses, 2, 7)


@pytest.mark.parametrize(("interval", "epochs", "expected"), [(1, 3, [1, 2, 3]), (2, 5, [2, 4, 5])])
def test_validation_runs_every_eval_interval_and_at_the_last_epoch(
    run: WorkerRun, interval: int, epochs: int, expected: list[int]
) -> None:
    train = run.experiment.train
    saved = (train.eval_interval, train.epochs)
    train.eval_interval, train.epochs = interval, epochs
    try:
        assert [e for e in range(1, epochs + 1) if worker._evaluates(run, e)] == expected
    finally:
        train.eval_interval, train.epochs = saved


def test_validation_on_one_worker_scores_every_val_image(run: WorkerRun) -> None:
    evaluation = worker._validate(run)
    assert evaluation is not None and 0.0 <= evaluation.metrics["pq"] <= 100.0
    assert set(evaluation.per_class) == {"panoptic", "instance", "semantic"}


def test_the_overlays_are_the_first_val_images_whatever_this_workers_share(run: WorkerRun) -> None:
    drawn = worker._overlays(run)
    assert len(drawn) == min(worker.NUM_OVERLAYS, len(run.datasets.val))
    for index, overlay in enumerate(drawn):
        image, _, _ = run.datasets.val[index]
        height, width = image.shape[-2:]
        assert overlay.dtype == np.uint8 and overlay.shape[0] >= height and overlay.shape[1] >= width
    # the same pictures from another worker's point of view (rank 1 of 2 holds other val images)
    other = _worker_run(run.experiment)
    other.rank, other.world_size = 1, 2
    other.core.load_state_dict(run.core.state_dict())
    assert all(np.array_equal(a, b) for a, b in zip(drawn, worker._overlays(other)))


def test_data_repeat_shows_the_train_split_that_many_times_per_epoch(tmp_path: Path) -> None:
    experiment = load_tiny(tmp_path, "data.synthetic.num_images=8", f"data.synthetic.cache_dir={tmp_path}")
    prepare_data(experiment)
    once = build_datasets(experiment)
    thrice = build_datasets(experiment.with_overrides({"data.repeat": 3}))
    assert len(thrice.train) == 3 * len(once.train)
    assert thrice.categories == once.categories and len(thrice.val) == len(once.val)

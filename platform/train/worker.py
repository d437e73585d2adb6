"""The per-worker training loop: plain PyTorch, with Ray at the marked lines only.

Each Ray Train worker runs :func:`train_fn_per_worker`, which reads top to bottom as its steps: set up
(data, model, optimiser, restore, DDP), then per epoch train on this worker's shard (DDP averages
gradients, the loss terms are averaged over workers), validate (every worker scores its share of the
val set, rank 0 merges and draws a few fixed val images), write a checkpoint atomically, log to MLflow
(rank 0) and ``ray.train.report`` (every worker, once per epoch; only rank 0 attaches the checkpoint).
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from knet_platform.experiment.schema import Experiment
from knet_platform.knet_adapter import (
    EvaluationResult,
    build_evaluators,
    build_model,
    collate_batch,
    contiguous_share,
    denormalize,
    evaluate,
    reduces_zero_label,
    render_overlay,
    to_device,
    transfer_from_bundle,
    write_bundle,
)
from knet_platform.train.checkpoints import (
    CheckpointScore,
    RngState,
    TrainingState,
    capture_rng_state,
    load_checkpoint,
    load_model_weights,
    restore_rng_state,
    rng_state_for_rank,
    save_checkpoint,
)
from knet_platform.train.datasets import Datasets, build_datasets, set_train_epoch
from knet_platform.train.ingest import TRAIN, iter_train_batches, rows_per_worker
from knet_platform.train.optim import build_optimizer, warmup_step_factor
from torch.utils.data import DataLoader, Subset

if TYPE_CHECKING:
    from knet_platform.knet_adapter import Batch
    from knet_platform.tracking.runs import RunLogger
    from ray.data import DataIterator

NUM_OVERLAYS = 3  # fixed val images (the first ones) drawn into MLflow at every evaluated epoch


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or inf: the run fails here rather than training on garbage. Not restarted: the
    same weights and batch give the same loss again."""

    deterministic = True


@dataclass(frozen=True)
class LoopConfig:
    """What the driver hands every worker (``train_loop_config``, shipped by Ray).

    experiment: the run's experiment, paths absolute, without a ``tune`` section. mlflow:
    ``{"tracking_uri", "run_id"}`` or None (no tracking). resume_from: a checkpoint folder to continue
    from when Ray has none. init_weights_from: a checkpoint folder whose model weights start a
    fine-tuning run. checkpoint_root: ``<storage_path>/<run name>``, where Ray Train persists the
    checkpoints (their URIs are recorded in MLflow as tags).
    """

    experiment: Experiment
    mlflow: dict[str, str] | None = None
    resume_from: str | None = None
    init_weights_from: str | None = None
    checkpoint_root: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "mlflow": self.mlflow,
            "resume_from": self.resume_from,
            "init_weights_from": self.init_weights_from,
            "checkpoint_root": self.checkpoint_root,
        }


@dataclass
class WorkerRun:
    """Everything one worker holds for the run; ``epoch`` (completed) and ``global_step`` advance."""

    loop: LoopConfig
    rank: int
    world_size: int
    device: torch.device
    datasets: Datasets
    train_loader: DataLoader | None  # None when Ray Data streams the train split (train_stream)
    train_stream: DataIterator | None
    val_loader: DataLoader | None
    loader_generator: torch.Generator
    model: torch.nn.Module  # DDP-wrapped with 2+ workers
    core: torch.nn.Module  # the K-Net module itself
    model_config: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    steps_per_epoch: int
    logger: RunLogger | None
    epoch: int = 0
    global_step: int = 0
    train_seconds: float = 0.0  # the last epoch's training time on this worker

    @property
    def experiment(self) -> Experiment:
        return self.loop.experiment


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Train one experiment on this worker (``config`` is :meth:`LoopConfig.to_dict`)."""
    _quiet_ray_train_reports()
    run = _set_up(LoopConfig(**config))
    epochs = run.experiment.train.epochs
    while run.epoch < epochs:
        epoch_number = run.epoch + 1
        metrics = _train_one_epoch(run)
        evaluation = _validate(run) if _evaluates(run, epoch_number) else None
        if evaluation is not None:
            metrics.update({f"val/{key}": value for key, value in evaluation.metrics.items()})
        if run.rank == 0:
            shown = " ".join(
                f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith(("train/loss", "val/"))
            )
            print(f"[epoch {epoch_number}/{epochs}] {shown} ({run.train_seconds:.1f}s train)")
        run.epoch = epoch_number
        _checkpoint_log_and_report(run, metrics, evaluation)


# ---- set-up --------------------------------------------------------------------------------------


def _set_up(loop: LoopConfig) -> WorkerRun:
    """Data, model, optimiser, restored state and DDP, in the order that keeps runs reproducible."""
    experiment, train = loop.experiment, loop.experiment.train
    context = ray.train.get_context()  # Ray
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()  # Ray
    _seed_everything(train.seed + rank)
    datasets = build_datasets(experiment)
    loader_generator = torch.Generator()
    train_loader, val_loader = _loaders(experiment, datasets, loader_generator, rank, world_size)
    train_stream = ray.train.get_dataset_shard(TRAIN) if train_loader is None else None  # Ray
    model_config = experiment.model_config(datasets.categories)
    # on the device before the optimizer exists, so restored optimizer state lands next to its params
    model = build_model(model_config).to(device)
    steps_per_epoch = _steps_per_epoch(experiment, train_loader, world_size)
    optimizer, scheduler, scaler = _optimisation(experiment, model, steps_per_epoch, device, rank)
    run = WorkerRun(
        loop, rank, world_size, device, datasets, train_loader, train_stream, val_loader, loader_generator,
        model, model, model_config, optimizer, scheduler, scaler, steps_per_epoch, logger=None,
    )  # fmt: skip
    restored = _restore(run)
    run.model = _distribute(model, world_size, device)
    if loop.mlflow is not None and rank == 0:
        # imported here: MLflow costs a worker ~0.9 s of CPU at start, and only rank 0 logs
        from knet_platform.tracking.runs import RunLogger, system_info

        run.logger = RunLogger(**loop.mlflow)
        # this worker's hardware, not the driver's (a CPU head on a GPU cluster); once per run
        run.logger.log_system_info_once(system_info(device=str(device), world_size=world_size))
        if restored:
            run.logger.set_tag("knet.restored_from_epoch", str(run.epoch))
    return run


def _loaders(
    experiment: Experiment, datasets: Datasets, generator: torch.Generator, rank: int, world_size: int
) -> tuple[DataLoader | None, DataLoader | None]:
    """This worker's train loader (Ray's DistributedSampler shards it; None when Ray Data streams the
    train split) and its share of the val set."""
    batch_size, num_workers = experiment.train.batch_size, experiment.data.num_workers
    train_loader = None
    if not experiment.data.streams_train:
        train_loader = DataLoader(
            datasets.train, batch_size=batch_size, shuffle=True, collate_fn=collate_batch,
            num_workers=num_workers, generator=generator, drop_last=False,
        )  # fmt: skip
        train_loader = ray.train.torch.prepare_data_loader(train_loader, move_to_device=False)  # Ray
    if datasets.val is None:
        return train_loader, None
    # The val set is split by hand into contiguous blocks: DistributedSampler would pad the last
    # shard with repeated images and the merged metrics would count them twice; contiguous, so a
    # packed val split's worker reads its own row groups only.
    share = Subset(datasets.val, contiguous_share(len(datasets.val), rank, world_size))
    val_loader = DataLoader(share, batch_size=batch_size, collate_fn=collate_batch, num_workers=num_workers)
    return train_loader, val_loader


def _steps_per_epoch(experiment: Experiment, train_loader: DataLoader | None, world_size: int) -> int:
    """Batches per epoch on each worker, capped by ``train.max_steps_per_epoch``."""
    if train_loader is not None:
        batches = len(train_loader)
    else:  # Ray Data gives every worker the same number of rows
        batches = math.ceil(rows_per_worker(experiment, world_size) / experiment.train.batch_size)
    return min(batches, experiment.train.max_steps_per_epoch or batches)


def _optimisation(
    experiment: Experiment, model: torch.nn.Module, steps_per_epoch: int, device: torch.device, rank: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, torch.amp.GradScaler | None]:
    """K-Net's AdamW recipe, its warmup-and-step schedule, and a grad scaler for AMP on CUDA."""
    train = experiment.train
    optimizer = build_optimizer(
        model, lr=train.lr, backbone_lr_mult=train.backbone_lr_mult,
        weight_decay=train.weight_decay, betas=tuple(train.betas),
    )  # fmt: skip
    schedule = warmup_step_factor(
        warmup_iters=train.warmup_iters, warmup_ratio=train.warmup_ratio, lr_steps=train.lr_steps,
        lr_gamma=train.lr_gamma, steps_per_epoch=steps_per_epoch,
    )  # fmt: skip
    use_amp = train.amp and device.type == "cuda"
    if train.amp and not use_amp and rank == 0:
        print("note: train.amp is on but the device is CPU; training in float32")
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule), scaler


def _restore(run: WorkerRun) -> bool:
    """Continue from Ray's latest checkpoint (a restarted worker group, ``--resume``) or the driver's
    ``resume_from``; else start a new run from :func:`_init_weights`. True if resumed."""
    ray_checkpoint = ray.train.get_checkpoint()  # Ray
    if ray_checkpoint is not None:
        with ray_checkpoint.as_directory() as folder:
            state, weights = load_checkpoint(folder), load_model_weights(folder)
    elif run.loop.resume_from is not None:
        state, weights = load_checkpoint(run.loop.resume_from), load_model_weights(run.loop.resume_from)
    else:
        _init_weights(run)
        return False
    run.core.load_state_dict(weights)
    run.optimizer.load_state_dict(state.optimizer)
    run.scheduler.load_state_dict(state.scheduler)
    if run.scaler is not None and state.scaler:
        run.scaler.load_state_dict(state.scaler)
    run.epoch, run.global_step = state.epoch, state.global_step
    _restore_rng(run, state)
    if run.rank == 0:
        print(f"resuming at epoch {run.epoch + 1} (step {run.global_step})")
    return True


def _init_weights(run: WorkerRun) -> None:
    """A new run's starting weights: ``--from-checkpoint``'s (our own model, loaded whole) or
    ``model.init_from``'s (a bundle the driver made local; its class-specific layers start afresh when
    its classes are not the dataset's). Neither: the model's own initialisation."""
    if run.loop.init_weights_from is not None:
        run.core.load_state_dict(load_model_weights(run.loop.init_weights_from))
        if run.rank == 0:
            print(f"fine-tuning from the weights in {run.loop.init_weights_from}")
    elif run.experiment.model.init_from is not None:
        report = transfer_from_bundle(run.core, run.experiment.model.init_from, run.datasets.categories)
        for line in report.lines() if run.rank == 0 else ():
            print(f"init_from: {line}")


def _restore_rng(run: WorkerRun, state: TrainingState) -> None:
    rng_state = rng_state_for_rank(state.rng, run.rank, run.world_size)
    if rng_state is not None:
        restore_rng_state(rng_state)  # this worker's own Python, NumPy and torch generators
        return
    _seed_everything(run.experiment.train.seed + run.rank + 7919 * run.epoch)
    if run.rank == 0:
        print(
            f"note: the checkpoint holds no RNG states for {run.world_size} workers (another worker "
            "count, or an older format that is not loaded); each worker is seeded afresh from "
            "train.seed, its rank and the epoch"
        )


def _distribute(model: torch.nn.Module, world_size: int, device: torch.device) -> torch.nn.Module:
    """DDP across the workers (Ray wraps only with 2+), with SyncBN on multi-GPU as the reference."""
    if world_size > 1 and device.type == "cuda":
        # the parameters stay the same objects, so the optimizer built before still holds them
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Every K-Net parameter takes part in every loss, with or without targets, for each task and head
    # (tests/knet/test_every_parameter_learns.py), so DDP needs no unused-parameter search (measured by
    # benchmarks/ddp_unused.py: it bought nothing and printed a warning per worker in every run).
    return ray.train.torch.prepare_model(  # Ray
        model, parallel_strategy_kwargs={"find_unused_parameters": False}
    )


# ---- one epoch -----------------------------------------------------------------------------------


def _train_one_epoch(run: WorkerRun) -> dict[str, float]:
    """Train over this worker's shard; the epoch's loss terms averaged over every worker's steps."""
    train = run.experiment.train
    epoch_number = run.epoch + 1
    started = time.perf_counter()
    run.model.train()
    loss_sums: dict[str, torch.Tensor] = {}
    steps = 0
    for batch in _epoch_batches(run):
        if steps >= run.steps_per_epoch:
            break
        losses = _train_step(run, batch)
        steps += 1
        for key, value in losses.items():
            loss_sums[key] = loss_sums.get(key, 0.0) + value.detach().double()
        if run.rank == 0 and train.log_every and steps % train.log_every == 0:
            loss = losses["loss"].item()
            print(f"epoch {epoch_number} step {steps}/{run.steps_per_epoch} loss {loss:.4f}")
            if run.logger is not None:
                run.logger.log_step({"train/step_loss": loss}, run.global_step)
    run.train_seconds = time.perf_counter() - started
    metrics: dict[str, float] = {"epoch": epoch_number}
    metrics.update(_mean_over_workers(loss_sums, steps, run.device))
    metrics["train/lr"] = run.optimizer.param_groups[0]["lr"]
    metrics["train/steps_per_s"] = steps / max(run.train_seconds, 1e-9)
    return metrics


def _epoch_batches(run: WorkerRun) -> Iterator[Batch]:
    """This worker's batches of the coming epoch: its DataLoader's (sampler and augmentation set to the
    epoch) or its Ray Data shard's, checked to carry the epoch's order."""
    if run.train_loader is not None:
        if run.world_size > 1:
            run.train_loader.sampler.set_epoch(run.epoch)
        set_train_epoch(run.datasets.train, run.epoch)
        seed = run.experiment.train.seed
        run.loader_generator.manual_seed(seed * 100_003 + run.epoch * run.world_size + run.rank)
        yield from run.train_loader
        return
    batches = iter_train_batches(
        run.train_stream, run.experiment, epoch=run.epoch, rank=run.rank, world_size=run.world_size
    )
    for step, (batch, _, epochs) in enumerate(batches):
        if step == 0 and run.rank == 0 and int(epochs[0]) != run.epoch:
            print(
                f"note: Ray Data delivered epoch {int(epochs[0]) + 1}'s order for epoch {run.epoch + 1} "
                "(every row still once); see docs/data-ingest.md"
            )
        yield batch


def _train_step(run: WorkerRun, batch: Any) -> dict[str, torch.Tensor]:
    """One optimiser step; returns ``{"loss": total, <term>: value, ...}``."""
    images = batch.images.to(run.device, non_blocking=True)
    targets = [to_device(target, run.device) for target in batch.targets]
    with torch.autocast(run.device.type, enabled=run.scaler is not None):
        losses = run.model(images, targets, image_sizes=batch.image_sizes)
    loss = sum(losses.values())
    _check_finite(loss, losses, run.epoch + 1, run.global_step)
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        run.scaler.unscale_(run.optimizer)
    else:
        loss.backward()
    if run.experiment.train.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.experiment.train.grad_clip)
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    run.scheduler.step()
    run.global_step += 1
    return {"loss": loss, **losses}


def _evaluates(run: WorkerRun, epoch_number: int) -> bool:
    train = run.experiment.train
    last = epoch_number == train.epochs
    return run.val_loader is not None and (epoch_number % train.eval_interval == 0 or last)


def _validate(run: WorkerRun) -> EvaluationResult | None:
    """Every worker scores its val share; rank 0 gets the merged result (others None)."""
    evaluators = build_evaluators(run.model_config, run.datasets.categories.names)
    return evaluate(run.core, run.val_loader, evaluators, device=run.device, gather=_gather_on_rank_0(run))


def _gather_on_rank_0(run: WorkerRun):  # noqa: ANN202 - a knet.evaluation Gather
    def gather(states: dict[str, Any]) -> list[dict[str, Any]] | None:
        if run.world_size == 1:
            return [states]
        gathered: list[Any] = [None] * run.world_size
        dist.all_gather_object(gathered, states)
        return gathered if run.rank == 0 else None

    return gather


@torch.no_grad()
def _overlays(run: WorkerRun) -> list[np.ndarray]:
    """The first ``NUM_OVERLAYS`` val images with the model's predictions drawn on them (rank 0
    predicts them itself, so the same images are drawn whatever the number of workers)."""
    dataset, transforms = run.datasets.val, run.experiment.data.transforms
    drawn = []
    run.core.eval()
    for index in range(min(NUM_OVERLAYS, len(dataset))):
        batch = collate_batch([dataset[index]])
        (size,) = [tuple(int(s) for s in size) for size in batch.image_sizes]
        (prediction,) = run.core(batch.images.to(run.device), image_sizes=batch.image_sizes)
        image = denormalize(batch.images[0], transforms.mean, transforms.std, size)
        prediction = to_device(prediction, "cpu").resized(size)
        drawn.append(render_overlay(image, prediction, run.datasets.categories.names))
    return drawn


# ---- checkpoint, log, report -----------------------------------------------------------------------


def _checkpoint_log_and_report(
    run: WorkerRun, metrics: dict[str, float], evaluation: EvaluationResult | None
) -> None:
    """Write the epoch's checkpoint (rank 0, atomically), log it to MLflow (rank 0) and report to Ray
    (every worker: reports must match across workers; only rank 0 attaches the checkpoint)."""
    train, epoch_number = run.experiment.train, run.epoch
    due = epoch_number % train.checkpoint_interval == 0 or epoch_number == train.epochs
    # every worker's RNG state goes into the checkpoint, so each resumes its own streams
    rng_states = _gather_rng_states(run.world_size) if due else None
    score = CheckpointScore.from_metrics(train.metric, train.mode, metrics)
    name = f"checkpoint_epoch_{epoch_number:04d}"
    with tempfile.TemporaryDirectory(prefix="knet-ckpt-") as scratch:
        folder = Path(scratch) / name
        checkpoint = None
        if due and run.rank == 0:
            _save(run, folder, rng_states, score)
            checkpoint = ray.train.Checkpoint.from_directory(str(folder))  # Ray
        if run.logger is not None:
            _log_epoch(run, metrics, evaluation, folder if checkpoint is not None else None, score)
        ray.train.report(  # Ray: every worker, once per epoch
            metrics, checkpoint=checkpoint, checkpoint_dir_name=name if checkpoint is not None else None
        )


def _save(run: WorkerRun, folder: Path, rng_states: list[RngState] | None, score: CheckpointScore) -> None:
    experiment = run.experiment
    state = TrainingState(
        optimizer=run.optimizer.state_dict(),
        scheduler=run.scheduler.state_dict(),
        scaler=run.scaler.state_dict() if run.scaler is not None else None,
        epoch=run.epoch,
        global_step=run.global_step,
        rng=rng_states or [],
    )

    def write_model(directory: Path) -> None:  # the checkpoint's model bundle (what gets registered)
        run.core.eval()
        write_bundle(
            directory, run.core, run.model_config, run.datasets.categories, experiment.data.transforms,
            reduce_zero_label=reduces_zero_label(experiment.data.train),
        )  # fmt: skip

    save_checkpoint(folder, state, write_model=write_model, score=score)


def _log_epoch(
    run: WorkerRun,
    metrics: dict[str, float],
    evaluation: EvaluationResult | None,
    checkpoint: Path | None,
    score: CheckpointScore,
) -> None:
    """Rank 0's MLflow record of an epoch: metrics, checkpoint tags (and files), per-class tables and
    overlays. A restarted worker group skips the epochs the run already holds."""
    logger, epoch_number = run.logger, run.epoch
    if not logger.log_epoch(metrics, epoch_number):
        return
    if checkpoint is not None and run.loop.checkpoint_root is not None:
        uri = f"{run.loop.checkpoint_root}/{checkpoint.name}"
        logger.tag_checkpoint(
            f"epoch_{epoch_number:04d}", uri, epoch=epoch_number, metric=score.metric, value=score.value
        )
    if checkpoint is not None and run.experiment.tracking.log_checkpoints == "all":
        logger.log_checkpoint(checkpoint, f"epoch_{epoch_number:04d}")
    if evaluation is not None:
        if evaluation.per_class:
            logger.log_per_class(evaluation.per_class, epoch_number)
        logger.log_overlays(_overlays(run), epoch_number)


def _gather_rng_states(world_size: int) -> list[RngState]:
    """Every worker's RNG state, by rank (a collective: every worker calls it at the same point)."""
    state = capture_rng_state()
    if world_size == 1:
        return [state]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, state)
    return gathered


def _mean_over_workers(sums: dict[str, torch.Tensor], steps: int, device: torch.device) -> dict[str, float]:
    """Per-step means of each loss term over every worker's steps (``train/<term>``)."""
    keys = sorted(sums)
    packed = torch.stack(
        [torch.as_tensor(sums[k], dtype=torch.float64) for k in keys]
        + [torch.tensor(steps, dtype=torch.float64)]
    )
    packed = packed.to(device)  # (num_terms + 1,)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(packed)
    total_steps = max(packed[-1].item(), 1.0)
    return {f"train/{key}": packed[i].item() / total_steps for i, key in enumerate(keys)}


def _check_finite(loss: torch.Tensor, losses: dict[str, torch.Tensor], epoch: int, step: int) -> None:
    if torch.isfinite(loss):
        return
    terms = ", ".join(f"{key}={value.item():.4g}" for key, value in losses.items())
    bad = [key for key, value in losses.items() if not math.isfinite(value.item())]
    raise NonFiniteLossError(
        f"non-finite loss at epoch {epoch}, global step {step}: total={loss.item()} from {bad} "
        f"(all terms: {terms}). Lower train.lr, keep train.grad_clip set, or check the data."
    )


def _quiet_ray_train_reports() -> None:
    """Ray Train 2.60 logs every ``report`` of every worker at INFO with all its metrics (a screenful
    per epoch, beside our one line); keep its warnings. That logger is named after its module's file."""
    from ray.train.v2._internal.execution import context as train_context  # Ray's internal logger name

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

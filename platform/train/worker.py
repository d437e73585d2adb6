"""The per-worker training loop: plain PyTorch, with Ray at the marked lines only.

Each Ray Train worker runs :func:`train_fn_per_worker`. Per epoch: train on this worker's shard
(DDP averages gradients), average the loss terms over workers, evaluate every worker's share of the
val set and merge the evaluator states on rank 0, write a checkpoint atomically, log to MLflow (rank 0)
and ``ray.train.report`` (every worker, once per epoch; only rank 0 attaches the checkpoint).
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from knet_platform.experiment.schema import Experiment
from knet_platform.knet_adapter import build_datasets, build_evaluators, build_knet, denormalize
from knet_platform.tracking.runs import RunLogger, system_info
from knet_platform.train.checkpoints import (
    CheckpointScore,
    RngState,
    TrainingState,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    rng_state_for_rank,
    save_checkpoint,
)
from knet_platform.train.optim import build_optimizer, warmup_step_factor
from torch.utils.data import DataLoader, Subset

from knet.data import collate_batch
from knet.evaluation import original_sizes, process_at_original_size

NUM_OVERLAYS = 2  # val images drawn into MLflow at the last epoch


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or inf: the run fails here rather than training on garbage."""


@dataclass(frozen=True)
class LoopConfig:
    """What the driver hands every worker (``train_loop_config``; plain types so Ray can ship it).

    experiment: ``Experiment.to_dict()`` with absolute paths. mlflow: ``{"tracking_uri", "run_id"}``
    or None (no tracking). resume_from: a checkpoint folder to continue from when Ray has none.
    init_weights_from: a checkpoint folder whose model weights start a fine-tuning run.
    checkpoint_root: ``<storage_path>/<run name>``, where Ray Train persists the checkpoints (their
    URIs are recorded in MLflow as tags).
    """

    experiment: dict[str, Any]
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


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Train one experiment on this worker (``config`` is :meth:`LoopConfig.to_dict`)."""
    _quiet_ray_train_reports()
    loop = LoopConfig(**config)
    experiment = Experiment.from_dict(loop.experiment)
    train_cfg = experiment.train
    context = ray.train.get_context()  # Ray
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()  # Ray
    _seed_everything(train_cfg.seed + rank)

    datasets = build_datasets(experiment)
    loader_generator = torch.Generator()
    train_loader = DataLoader(
        datasets.train,
        batch_size=train_cfg.batch_size,
        shuffle=True,
        collate_fn=collate_batch,
        num_workers=experiment.data.num_workers,
        generator=loader_generator,
        drop_last=False,
    )
    train_loader = ray.train.torch.prepare_data_loader(train_loader, move_to_device=False)  # Ray
    # The val set is split by hand (every world_size-th image): DistributedSampler would pad the last
    # shard with repeated images and the merged metrics would count them twice.
    val_loader = None
    if datasets.val is not None:
        val_loader = DataLoader(
            Subset(datasets.val, range(rank, len(datasets.val), world_size)),
            batch_size=train_cfg.batch_size,
            collate_fn=collate_batch,
            num_workers=experiment.data.num_workers,
        )

    model, model_config = build_knet(experiment, datasets.categories)
    # on the device before the optimizer exists, so restored optimizer state lands next to its params
    model.to(device)
    steps_per_epoch = len(train_loader)
    if train_cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, train_cfg.max_steps_per_epoch)
    use_amp = train_cfg.amp and device.type == "cuda"
    if train_cfg.amp and not use_amp and rank == 0:
        print("note: train.amp is on but the device is CPU; training in float32")
    optimizer = build_optimizer(
        model,
        lr=train_cfg.lr,
        backbone_lr_mult=train_cfg.backbone_lr_mult,
        weight_decay=train_cfg.weight_decay,
        betas=tuple(train_cfg.betas),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        warmup_step_factor(
            warmup_iters=train_cfg.warmup_iters,
            warmup_ratio=train_cfg.warmup_ratio,
            lr_steps=train_cfg.lr_steps,
            lr_gamma=train_cfg.lr_gamma,
            steps_per_epoch=steps_per_epoch,
        ),
    )
    scaler = torch.amp.GradScaler("cuda") if use_amp else None

    start_epoch, global_step = 0, 0
    ray_checkpoint = ray.train.get_checkpoint()  # Ray
    if ray_checkpoint is not None:
        with ray_checkpoint.as_directory() as folder:
            state = load_checkpoint(folder)
    elif loop.resume_from is not None:
        state = load_checkpoint(loop.resume_from)
    else:
        state = None
    if state is not None:
        model.load_state_dict(state.model)
        optimizer.load_state_dict(state.optimizer)
        scheduler.load_state_dict(state.scheduler)
        if scaler is not None and state.scaler:
            scaler.load_state_dict(state.scaler)
        start_epoch, global_step = state.epoch, state.global_step
        rng_state = rng_state_for_rank(state.rng, rank, world_size)
        if rng_state is not None:
            restore_rng_state(rng_state)  # this worker's own Python, NumPy and torch generators
        else:
            _seed_everything(train_cfg.seed + rank + 7919 * start_epoch)
            if rank == 0:
                print(
                    f"note: the checkpoint holds no RNG states for {world_size} workers (another worker "
                    "count, or an older format that is not loaded); each worker is seeded afresh from "
                    "train.seed, its rank and the epoch"
                )
        if rank == 0:
            print(f"resuming at epoch {start_epoch + 1} (step {global_step})")
    elif loop.init_weights_from is not None:
        model.load_state_dict(load_checkpoint(loop.init_weights_from).model)
        if rank == 0:
            print(f"fine-tuning from the weights in {loop.init_weights_from}")

    if world_size > 1 and device.type == "cuda":
        # the reference trains with SyncBN across GPUs (semantic decode heads, trainable backbone BN);
        # the parameters stay the same objects, so the optimizer built above still holds them
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # DDP's unused-parameter search: a stage's class branch gets no gradient on a batch without targets.
    model = ray.train.torch.prepare_model(  # Ray
        model, parallel_strategy_kwargs={"find_unused_parameters": True}
    )
    core = getattr(model, "module", model)
    logger = RunLogger(**loop.mlflow) if loop.mlflow is not None and rank == 0 else None
    if logger is not None:
        # this worker's hardware, not the driver's (a CPU head on a GPU cluster); once per run
        logger.log_system_info_once(system_info(device=str(device), world_size=world_size))
    if logger is not None and state is not None:
        logger.set_tag("knet.restored_from_epoch", str(start_epoch))

    for epoch in range(start_epoch, train_cfg.epochs):
        epoch_number = epoch + 1
        if world_size > 1:
            train_loader.sampler.set_epoch(epoch)
        loader_generator.manual_seed(train_cfg.seed * 100_003 + epoch * world_size + rank)
        started = time.perf_counter()
        model.train()
        loss_sums: dict[str, torch.Tensor] = {}
        steps = 0
        for batch in train_loader:
            if steps >= steps_per_epoch:
                break
            images = batch.images.to(device, non_blocking=True)
            targets = [_to_device(target, device) for target in batch.targets]
            with torch.autocast(device.type, enabled=use_amp):
                losses = model(images, targets, image_sizes=batch.image_sizes)
            loss = sum(losses.values())
            _check_finite(loss, losses, epoch_number, global_step)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if train_cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            global_step += 1
            steps += 1
            for key, value in {"loss": loss, **losses}.items():
                loss_sums[key] = loss_sums.get(key, 0.0) + value.detach().double()
            if rank == 0 and train_cfg.log_every and steps % train_cfg.log_every == 0:
                print(f"epoch {epoch_number} step {steps}/{steps_per_epoch} loss {loss.item():.4f}")
                if logger is not None:
                    logger.log_step({"train/step_loss": loss.item()}, global_step)
        train_seconds = time.perf_counter() - started

        metrics: dict[str, float] = {"epoch": epoch_number}
        metrics.update(_mean_over_workers(loss_sums, steps, device))
        metrics["train/lr"] = optimizer.param_groups[0]["lr"]
        metrics["train/steps_per_s"] = steps / max(train_seconds, 1e-9)
        is_last = epoch_number == train_cfg.epochs
        evaluation = None
        if val_loader is not None and (epoch_number % train_cfg.eval_interval == 0 or is_last):
            evaluation = _evaluate(
                core,
                val_loader,
                experiment,
                model_config,
                datasets.categories.names,
                device,
                rank,
                world_size,
            )
            metrics.update(evaluation.metrics)
        if rank == 0:
            summary = " ".join(
                f"{k}={v:.4g}" for k, v in metrics.items() if k.startswith(("train/loss", "val/"))
            )
            print(f"[epoch {epoch_number}/{train_cfg.epochs}] {summary} ({train_seconds:.1f}s train)")

        write_checkpoint = epoch_number % train_cfg.checkpoint_interval == 0 or is_last
        # every worker's RNG state goes into the checkpoint, so each resumes its own streams
        rng_states = _gather_rng_states(world_size) if write_checkpoint else None
        with tempfile.TemporaryDirectory(prefix="knet-ckpt-") as scratch:
            checkpoint = None
            checkpoint_name = f"checkpoint_epoch_{epoch_number:04d}"
            score = CheckpointScore.from_metrics(train_cfg.metric, train_cfg.mode, metrics)
            if write_checkpoint and rank == 0:
                folder = save_checkpoint(
                    Path(scratch) / checkpoint_name,
                    TrainingState(
                        model=core.state_dict(),
                        optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(),
                        scaler=scaler.state_dict() if scaler is not None else None,
                        epoch=epoch_number,
                        global_step=global_step,
                        rng=rng_states,
                        experiment=loop.experiment,
                    ),
                    score=score,
                )
                checkpoint = ray.train.Checkpoint.from_directory(str(folder))  # Ray
            if logger is not None and logger.log_epoch(metrics, epoch_number):
                if checkpoint is not None and loop.checkpoint_root is not None:
                    logger.tag_checkpoint(
                        f"epoch_{epoch_number:04d}",
                        f"{loop.checkpoint_root}/{checkpoint_name}",
                        epoch=epoch_number,
                        metric=score.metric,
                        value=score.value,
                    )
                if checkpoint is not None and experiment.tracking.log_checkpoints == "all":
                    logger.log_checkpoint(folder, f"epoch_{epoch_number:04d}")
                if evaluation is not None and evaluation.per_class:
                    logger.log_per_class(evaluation.per_class, epoch_number)
                if is_last and evaluation is not None and evaluation.overlay_images:
                    logger.log_overlays(
                        evaluation.overlay_images, evaluation.overlay_predictions, epoch_number
                    )
            ray.train.report(  # Ray: every worker, once per epoch
                metrics,
                checkpoint=checkpoint,
                checkpoint_dir_name=checkpoint_name if checkpoint is not None else None,
            )


@dataclass
class Evaluation:
    """One validation pass as rank 0 sees it: ``val/<metric>`` floats, each evaluator's per-class table
    (by evaluator name: panoptic, instance, semantic) and a few (image, prediction) pairs for overlays."""

    metrics: dict[str, float] = field(default_factory=dict)
    per_class: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    overlay_images: list[np.ndarray] = field(default_factory=list)
    overlay_predictions: list[Any] = field(default_factory=list)


@torch.no_grad()
def _evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    experiment: Experiment,
    model_config: Any,
    class_names: list[str],
    device: torch.device,
    rank: int,
    world_size: int,
) -> Evaluation:
    """Evaluate this worker's shard at each image's original size, merge every worker's evaluator
    states on rank 0 (every other rank gets an empty ``Evaluation``)."""
    model.eval()
    evaluators = build_evaluators(model_config, class_names)
    for evaluator in evaluators.values():
        evaluator.reset()
    overlay_images: list[np.ndarray] = []
    overlay_predictions: list[Any] = []
    for batch in loader:
        predictions = model(
            batch.images.to(device), image_sizes=batch.image_sizes, output_sizes=original_sizes(batch.metas)
        )
        predictions = [_to_device(p, torch.device("cpu")) for p in predictions]
        targets = [_to_device(t, torch.device("cpu")) for t in batch.targets]
        process_at_original_size(evaluators.values(), predictions, targets, batch.metas)
        if rank == 0 and len(overlay_images) < NUM_OVERLAYS:
            for image, prediction, size in zip(batch.images, predictions, batch.image_sizes):
                if len(overlay_images) < NUM_OVERLAYS:
                    overlay_images.append(denormalize(image, experiment, tuple(size)))
                    overlay_predictions.append(prediction.resized(tuple(size)))  # onto the image as seen
    states = {name: evaluator.state() for name, evaluator in evaluators.items()}
    if world_size > 1:
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, states)
    else:
        gathered = [states]
    if rank != 0:
        return Evaluation()
    result = Evaluation(overlay_images=overlay_images, overlay_predictions=overlay_predictions)
    for name, evaluator in evaluators.items():
        evaluator.reset()
        evaluator.merge([worker_states[name] for worker_states in gathered])
        for key, value in evaluator.evaluate().items():
            if isinstance(value, (int, float)):
                result.metrics[f"val/{key}"] = float(value)
            elif key == "per_class":
                result.per_class[name] = value
    return result


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


def _to_device(value: Any, device: torch.device) -> Any:
    """Tensors inside dicts, lists and dataclasses moved to ``device`` (other values unchanged)."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.replace(
            value,
            **{
                f.name: _to_device(getattr(value, f.name), device)
                for f in dataclasses.fields(value)
                if f.init
            },
        )
    return value


def _quiet_ray_train_reports() -> None:
    """Ray Train 2.60 logs every ``report`` of every worker at INFO with all its metrics (a screenful
    per epoch, beside our one line); keep its warnings. That logger is named after its module's file."""
    from ray.train.v2._internal.execution import context as train_context  # Ray's internal logger name

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)

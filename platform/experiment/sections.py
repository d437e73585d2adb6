"""The experiment YAML's sections other than the model: data, train, scaling, tracking and tune, each a
dataclass that checks its own values (``require`` names the dotted key and the fix). Checks that need
several sections at once live in ``Experiment`` (schema.py) and, for searches, ``tune/validation.py``."""

from __future__ import annotations

import difflib
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from knet_platform.experiment.building import require
from knet_platform.knet_adapter import DataSource, TransformConfig

Mode = Literal["max", "min"]


@dataclass
class SyntheticConfig:
    """Generated shapes dataset (``knet.data.synthesize``), written once into ``cache_dir``."""

    num_images: int = 64
    seed: int = 0
    image_size: list[int] = field(default_factory=lambda: [128, 128])
    cache_dir: str = ".knet/data/synthetic"

    def __post_init__(self) -> None:
        require(self.num_images >= 2, "data.synthetic.num_images", "must be >= 2 (train and val)")
        require(
            len(self.image_size) == 2 and min(self.image_size) >= 32,
            "data.synthetic.image_size",
            "must be [H, W] with both >= 32",
        )


IngestEngine = Literal["auto", "ray_data", "dataloader"]


@dataclass
class IngestConfig:
    """How train samples reach the workers (docs/data-ingest.md).

    engine: ``ray_data`` streams a ``parquet`` train split through Ray Data (read, decode and augment
    in Ray tasks, each row once per epoch across the workers); ``dataloader`` reads it in each worker
    with a PyTorch DataLoader; ``auto`` picks ``ray_data`` for Parquet and ``dataloader`` otherwise.
    shuffle_buffer_rows: rows each worker shuffles locally after the seeded shard order (0: none).
    cpus_per_task: CPUs a Ray Data read/decode task reserves. prefetch_batches: batches each worker
    keeps ready ahead of the step.
    """

    engine: IngestEngine = "auto"
    shuffle_buffer_rows: int = 64
    cpus_per_task: float = 1.0
    prefetch_batches: int = 2

    def __post_init__(self) -> None:
        require(
            self.shuffle_buffer_rows >= 0,
            "data.ingest.shuffle_buffer_rows",
            "must be >= 0 (0: no local shuffle)",
        )
        require(self.cpus_per_task > 0, "data.ingest.cpus_per_task", "must be > 0 (e.g. 1 or 0.5)")
        require(self.prefetch_batches >= 0, "data.ingest.prefetch_batches", "must be >= 0")


@dataclass
class DataConfig:
    train: DataSource | None = None
    val: DataSource | None = None
    transforms: TransformConfig = field(default_factory=TransformConfig)
    synthetic: SyntheticConfig | None = None
    num_workers: int = 2  # DataLoader workers per Ray worker
    repeat: int = 1  # the train split is seen this many times per epoch (a tiny dataset: more steps)
    ingest: IngestConfig = field(default_factory=IngestConfig)

    def __post_init__(self) -> None:
        require(self.num_workers >= 0, "data.num_workers", "must be >= 0 (0 loads in the worker)")
        require(self.repeat >= 1, "data.repeat", "must be >= 1 (1 = each train image once per epoch)")
        if self.ingest.engine == "ray_data" and self.train is not None:
            require(
                self.train.format == "parquet",
                "data.ingest.engine",
                f"is ray_data, which streams Parquet shards, but data.train.format is {self.train.format!r}: "
                "pack the split with `knet data pack` or use engine: auto",
            )

    @property
    def streams_train(self) -> bool:
        """The train split goes through Ray Data (see :class:`IngestConfig`)."""
        if self.train is None or self.ingest.engine == "dataloader":
            return False
        return self.train.format == "parquet"


@dataclass
class TrainConfig:
    """Optimisation schedule. ``batch_size`` is per Ray worker; ``lr_steps`` are epochs."""

    epochs: int = 12
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.05
    backbone_lr_mult: float = 0.25
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_iters: int = 1000
    warmup_ratio: float = 1e-3
    lr_steps: list[int] = field(default_factory=lambda: [8, 11])
    lr_gamma: float = 0.1
    grad_clip: float | None = 1.0
    amp: bool = True  # CUDA only; the trainer ignores it on CPU with a logged note
    eval_interval: int = 1
    checkpoint_interval: int = 1
    keep_checkpoints: int = 2
    seed: int = 0
    max_steps_per_epoch: int | None = None
    log_every: int = 10
    metric: str = "val/pq"
    mode: Mode = "max"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_interval", "checkpoint_interval", "keep_checkpoints"):
            require(getattr(self, name) >= 1, f"train.{name}", "must be >= 1")
        require(self.lr > 0, "train.lr", "must be > 0")
        require(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        require(self.backbone_lr_mult >= 0, "train.backbone_lr_mult", "must be >= 0")
        require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "train.betas",
            "must be two numbers in [0, 1)",
        )
        require(self.warmup_iters >= 0, "train.warmup_iters", "must be >= 0")
        require(0 < self.warmup_ratio <= 1, "train.warmup_ratio", "must be in (0, 1]")
        require(
            list(self.lr_steps) == sorted(self.lr_steps) and all(s >= 1 for s in self.lr_steps),
            "train.lr_steps",
            "must be increasing epochs >= 1",
        )
        require(0 < self.lr_gamma <= 1, "train.lr_gamma", "must be in (0, 1]")
        require(self.grad_clip is None or self.grad_clip > 0, "train.grad_clip", "must be > 0 or null")
        require(
            self.max_steps_per_epoch is None or self.max_steps_per_epoch >= 1,
            "train.max_steps_per_epoch",
            "must be >= 1 or null (whole epoch)",
        )
        require(self.log_every >= 0, "train.log_every", "must be >= 0 (0 = per epoch only)")
        require(
            re.fullmatch(r"(train|val)/\w+", self.metric) is not None,
            "train.metric",
            f"must look like 'val/pq' or 'train/loss', got {self.metric!r}",
        )


@dataclass
class ScalingConfig:
    """Ray Train's ``ScalingConfig``, checked here for the combinations Ray would refuse only after
    the cluster and the MLflow run exist.

    wait_for_resources: when the connected cluster cannot place every worker now, wait for its
    autoscaler to add nodes instead of refusing the run (a local Ray started by ``knet`` never grows,
    so there the run is refused either way).
    """

    num_workers: int = 2
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    wait_for_resources: bool = False

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, "scaling.num_workers", "must be >= 1")
        require(
            all(v >= 0 for v in self.resources_per_worker.values()),
            "scaling.resources_per_worker",
            "amounts must be >= 0",
        )
        gpus = self.resources_per_worker.get("GPU")
        require(
            self.use_gpu or not gpus,
            "scaling.resources_per_worker",
            f"asks for GPU: {gpus} per worker but scaling.use_gpu is false; set scaling.use_gpu=true "
            "to train on GPUs, or remove GPU from resources_per_worker",
        )
        require(
            not self.use_gpu or gpus is None or gpus > 0,
            "scaling.resources_per_worker",
            "GPU: 0 but scaling.use_gpu is true; give each worker a GPU (GPU: 1, the default with "
            "use_gpu) or set scaling.use_gpu=false",
        )
        require(
            self.use_gpu or any(v > 0 for v in self.resources_per_worker.values()),
            "scaling.resources_per_worker",
            f"{self.resources_per_worker} reserves nothing per worker, which Ray refuses; give each "
            "worker something, e.g. {CPU: 1}",
        )


@dataclass
class TrackingConfig:
    """MLflow and Ray storage. ``None`` paths default under ``$KNET_HOME`` (default ``<cwd>/.knet``;
    resolved by ``knet_platform.tracking.runs.resolve_tracking``)."""

    uri: str | None = None
    artifact_location: str | None = None
    experiment_name: str | None = None
    registered_model: str | None = None
    alias: str = "champion"
    log_checkpoints: Literal["best", "all", "none"] = "best"
    storage_path: str | None = None

    def __post_init__(self) -> None:
        require(bool(self.alias), "tracking.alias", "must be a non-empty string")


@dataclass
class SearchSpec:
    """One search dimension; YAML form ``{choice: [...]}`` / ``{loguniform: [1e-5, 1e-3]}``."""

    YAML_FORM: typing.ClassVar[str] = "one operator, e.g. {choice: [50, 100]}"

    op: Literal["choice", "grid", "uniform", "loguniform", "randint", "qrandint"]
    args: list[Any]

    def to_dict(self) -> dict[str, Any]:
        return {self.op: list(self.args)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchSpec:
        ops = typing.get_args(typing.get_type_hints(cls)["op"])
        if len(data) != 1:
            raise ValueError(f"write {cls.YAML_FORM}; operators: {', '.join(ops)}")
        ((op, args),) = data.items()
        if op not in ops:
            close = difflib.get_close_matches(str(op), ops, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"use one of {', '.join(ops)}"
            raise ValueError(f"unknown operator '{op}': {hint}")
        if not isinstance(args, list) or not args:
            raise ValueError(f"{op} takes a non-empty list, got {args!r}")
        return cls(op=op, args=list(args))


@dataclass
class SchedulerConfig:
    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = 1
    reduction_factor: int = 2
    max_epochs: int | None = None  # None -> train.epochs


@dataclass
class TuneConfig:
    """The ``tune`` section's fields and defaults; what their values must be (with each other and with
    the rest of the experiment) is checked before a search runs, by ``validate_search`` in
    ``knet_platform.tune.validation``."""

    space: dict[str, SearchSpec] = field(default_factory=dict)
    num_samples: int = 1
    metric: str | None = None  # None -> train.metric
    mode: Mode | None = None  # None -> train.mode
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    search_alg: Literal["random", "grid", "optuna"] = "random"
    max_concurrent_trials: int | None = None
    trial_driver_cpus: float = 0.25  # CPU reserved per trial for its Train driver (platform-notes)

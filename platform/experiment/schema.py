"""The experiment YAML as validating dataclasses: one file describes data, model, training, scaling,
tracking and (optionally) a Tune search.

Everything is checked here, before Ray, MLflow or torch do anything expensive: unknown keys (with a
did-you-mean and the dotted path), wrong types, missing local data paths, impossible combinations.
Every problem raises one ``ExperimentError`` naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from knet_platform.experiment.building import ExperimentError, build, plain_fields, require
from knet_platform.experiment.home import local_path
from knet_platform.experiment.overrides import (
    apply_overrides,
    parse_override,
    yaml_error_cause,
    yaml_error_location,
)
from knet_platform.experiment.yaml_loader import load_yaml
from knet_platform.knet_adapter import (
    ConfigFieldError,
    DataSource,
    KNetConfig,
    TransformConfig,
    model_config_for_task,
    model_keys,
    with_class_counts,
)
from knet_platform.redaction import MASK, is_secret_key, redact_text

if TYPE_CHECKING:
    from knet_platform.knet_adapter import CategoryTable

Task = Literal["panoptic", "instance", "semantic"]
Mode = Literal["max", "min"]
SYNTHETIC_PLACEHOLDER = "{synthetic}"  # in data paths: replaced by data.synthetic.cache_dir
_PATH_FIELDS = ("images", "annotations", "masks", "shards")


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


@dataclass
class ModelSection:
    """The ``model`` section: the keys the YAML writes (over the task's paper preset) and the
    ``KNetConfig`` they build, made once when the experiment is built (:meth:`Experiment.from_dict`).
    Its class counts are placeholders until :meth:`for_categories` fills in the dataset's."""

    YAML_FORM: typing.ClassVar[str] = "model keys over the task's preset, e.g. {num_proposals: 100}"

    written: dict[str, Any] = field(default_factory=dict)
    config: KNetConfig | None = field(default=None, compare=False, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSection:
        return cls(written=dict(data))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.written)

    @property
    def init_from(self) -> str | None:
        """``model.init_from``: the model whose weights start this run (a ``models:/`` or ``runs:/`` URI,
        a bundle or checkpoint folder); its class-specific layers start afresh when its classes differ."""
        return self.written.get(INIT_FROM)

    def with_init_from(self, source: str) -> ModelSection:
        """This section with ``init_from`` replaced (the driver ships the downloaded local folder)."""
        return ModelSection(written={**self.written, INIT_FROM: source}, config=self.config)

    def bind(self, task: str) -> KNetConfig:
        """Build (once) and return the section's config for ``task``; errors name the model key."""
        if self.config is None or self.config.task != task:
            section = dict(self.written)
            _check_init_from(section.pop(INIT_FROM, None))
            _check_model_key_names(section)
            if section.pop("task", task) != task:
                raise ExperimentError(
                    f"model.task={self.written['task']!r} differs from task={task!r}: remove model.task"
                )
            try:
                self.config = model_config_for_task(task, section)
            except ConfigFieldError as error:
                raise ExperimentError(f"model.{error.key}: {error.problem}") from None
            except (ValueError, TypeError) as error:
                raise ExperimentError(f"model: {error}") from None
        return self.config

    def for_categories(self, categories: CategoryTable) -> KNetConfig:
        """The model config with the dataset's class counts (a count the YAML gives must match)."""
        found = {
            "num_thing_classes": categories.num_thing_classes,
            "num_stuff_classes": categories.num_stuff_classes,
        }
        for key, count in found.items():
            written = self.written.get(key)
            if written is not None and written != count:
                raise ExperimentError(
                    f"model.{key}={written} but the dataset has {count}: remove model.{key} "
                    "(class counts come from the dataset's categories)"
                )
        assert self.config is not None, "ModelSection.bind runs when the experiment is built"
        return with_class_counts(self.config, categories)


INIT_FROM = "init_from"  # the one model key that is not a KNetConfig field


def _check_init_from(value: Any) -> None:
    require(
        value is None or (isinstance(value, str) and value.strip() != ""),
        f"model.{INIT_FROM}",
        f"must be a model URI (models:/NAME@ALIAS, runs:/...) or a folder, got {value!r}",
    )


def _check_model_key_names(section: dict[str, Any]) -> None:
    """An unknown top-level model key, with a did-you-mean over the config fields and ``init_from``."""
    known = [f.name for f in dataclasses.fields(KNetConfig)] + [INIT_FROM]
    for key in section:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean 'model.{close[0]}'?" if close else f"known keys: {', '.join(known)}"
            raise ExperimentError(f"model.{key}: is unknown; {hint}")


@dataclass
class Experiment:
    """One experiment file. Paths are absolute once built (see ``from_dict``'s ``base_dir``)."""

    name: str
    task: Task
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tune: TuneConfig | None = None

    # ---- building ------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, base_dir: str | Path | None = None) -> Experiment:
        """Strict build; relative data paths resolve against ``base_dir`` (default: cwd), the
        synthetic cache and tracking paths against the cwd, except that ``.knet/...`` means
        ``$KNET_HOME/...`` (see ``knet_platform.experiment.home``)."""
        experiment = build(cls, data, "")
        experiment._resolve(Path(base_dir) if base_dir is not None else Path.cwd())
        experiment._check()
        return experiment

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-safe dicts; ``from_dict(to_dict())`` gives an equal experiment."""
        return plain_fields(self)

    def with_overrides(self, overrides: dict[str, Any]) -> Experiment:
        """A new, validated experiment with dotted keys (``model.num_proposals``) replaced."""
        raw = apply_overrides(self.to_dict(), overrides, model_keys=MODEL_KEYS)
        try:
            return Experiment.from_dict(raw)
        except ExperimentError as error:
            keys = ", ".join(overrides)
            raise ExperimentError(f"{error} (after overriding {keys})") from None

    # ---- derived -------------------------------------------------------------------------

    def model_config(self, categories: CategoryTable | None = None) -> KNetConfig:
        """The ``KNetConfig``: the task's paper preset with the ``model`` section over it, class counts
        from ``categories`` (placeholders when None: for validation and display only)."""
        if categories is None:
            return self.model.bind(self.task)
        return self.model.for_categories(categories)

    def without_tune(self) -> Experiment:
        """This experiment as one training run sees it: no ``tune`` section (a trial's values are
        already applied), the model config already built."""
        return dataclasses.replace(self, tune=None)

    def resolved_paths(self) -> dict[str, str]:
        """Every data path by dotted key, absolute (already resolved when the experiment was built)."""
        paths = {}
        for split in ("train", "val"):
            source = getattr(self.data, split)
            for name in _PATH_FIELDS if source is not None else ():
                if getattr(source, name):
                    paths[f"data.{split}.{name}"] = getattr(source, name)
        if self.data.synthetic is not None:
            paths["data.synthetic.cache_dir"] = self.data.synthetic.cache_dir
        return paths

    # ---- internals -----------------------------------------------------------------------

    def _resolve(self, base_dir: Path) -> None:
        synthetic = self.data.synthetic
        if synthetic is not None:
            synthetic.cache_dir = str(local_path(synthetic.cache_dir))  # .knet/... is under $KNET_HOME
        for split in ("train", "val"):
            source = getattr(self.data, split)
            for name in _PATH_FIELDS if source is not None else ():
                value = getattr(source, name)
                if not value or "://" in value:
                    continue
                if SYNTHETIC_PLACEHOLDER in value:
                    if synthetic is None:
                        raise ExperimentError(
                            f"data.{split}.{name}={value!r} uses {SYNTHETIC_PLACEHOLDER} but there is no "
                            "data.synthetic section: add one or write the real path"
                        )
                    value = value.replace(SYNTHETIC_PLACEHOLDER, synthetic.cache_dir)
                setattr(source, name, str(_absolute(value, base_dir)))
        init_from = self.model.init_from
        if isinstance(init_from, str) and init_from.strip() and not _is_uri(init_from):
            self.model = self.model.with_init_from(str(_absolute(init_from, base_dir)))
        for name in ("storage_path", "artifact_location"):
            value = getattr(self.tracking, name)
            if value and "://" not in value:
                setattr(self.tracking, name, str(local_path(value)))

    def _check(self) -> None:
        require(
            bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*", self.name)), "name", "use letters, digits, '.', '_', '-'"
        )
        weights = self.model.bind(self.task).backbone.pretrained_path
        if weights and "://" not in weights and not Path(weights).is_file():
            raise ExperimentError(
                f"model.backbone.pretrained_path: {weights} does not exist. Point it at a local weights "
                "file (nothing is downloaded) or set it to null for random initialisation."
            )
        self._check_init_from()
        metric = self.train.metric
        if metric.startswith("val/"):
            require(
                self.data.val is not None,
                "train.metric",
                f"{metric!r} needs data.val; set data.val or use 'train/loss'",
            )
            known = _VAL_METRICS[self.task]
            require(
                metric[4:] in known,
                "train.metric",
                f"{metric!r} is not reported for task {self.task!r}; use one of "
                + ", ".join(f"val/{m}" for m in known),
            )
        require(self.data.train is not None, "data.train", "set a DataSource (format, images, ...)")
        expected_format = {
            "panoptic": ("coco_panoptic", "parquet"),
            "instance": ("coco_instance", "parquet"),
            "semantic": ("semantic", "parquet"),
        }[self.task]
        for split in ("train", "val"):
            source = getattr(self.data, split)
            if source is None:
                continue
            require(
                source.format in expected_format,
                f"data.{split}.format",
                f"{source.format!r} does not fit task {self.task!r}; use {' or '.join(expected_format)}",
            )
            for name in _PATH_FIELDS:
                value = getattr(source, name)
                if not value or "://" in value or Path(value).exists():
                    continue
                synthetic = self.data.synthetic
                if synthetic is not None and Path(value).is_relative_to(synthetic.cache_dir):
                    continue  # generated on first run
                raise ExperimentError(
                    f"data.{split}.{name}: {value} does not exist. Fix the path (relative paths are "
                    "resolved against the YAML file's folder) or add a data.synthetic section."
                )

    def _check_init_from(self) -> None:
        source = self.model.init_from
        if source is None:
            return
        require(
            self.tune is None,
            f"model.{INIT_FROM}",
            "a search starts every trial from scratch; remove the tune section to fine-tune",
        )
        require(
            _is_uri(source) or Path(source).is_dir(),
            f"model.{INIT_FROM}",
            f"{source} is not a folder; give a model bundle or checkpoint folder (relative paths are "
            "resolved against the YAML file's folder) or a model URI such as models:/NAME@champion",
        )


_VAL_METRICS = {
    "panoptic": (
        "pq",
        "sq",
        "rq",
        "pq_th",
        "sq_th",
        "rq_th",
        "pq_st",
        "sq_st",
        "rq_st",
        "mask_ap",
        "mask_ap50",
        "mask_ap75",
        "miou",
        "macc",
        "aacc",
    ),
    "instance": ("mask_ap", "mask_ap50", "mask_ap75", "mask_aps", "mask_apm", "mask_apl"),
    "semantic": ("miou", "macc", "aacc"),
}
# every dotted key an override may set inside the model section (the same fields for every task)
MODEL_KEYS = {f"model.{key}" for key in model_keys(KNetConfig())} | {f"model.{INIT_FROM}"}


def load_experiment(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Experiment:
    """Read an experiment YAML (a ``yaml.SafeLoader``, see yaml_text) and apply ``--set key=value`` strings."""
    path = Path(path)
    if not path.is_file():
        raise ExperimentError(f"experiment file {path} does not exist: pass the path of a YAML file")
    try:
        raw = load_yaml(path.read_text())
    except UnicodeDecodeError as error:
        raise ExperimentError(
            f"{path} is not UTF-8 text (byte {error.start}): save the experiment YAML as UTF-8"
        ) from None
    except yaml.YAMLError as error:
        location = yaml_error_location(error)
        where = f"{path}:{location[0]}:{location[1]}" if location else str(path)
        raise ExperimentError(
            f"{where}: {yaml_error_cause(error)}: this is not valid YAML; fix the syntax there"
        ) from None
    if raw is None:
        raise ExperimentError(
            f"{path} is empty (or holds only comments): write the experiment in it "
            "(name, task, model, data, ...; see experiments/ for examples)"
        )
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path} must hold a mapping with name, task, model, data, ...")
    parsed = dict(parse_override(text) for text in overrides)
    raw = apply_overrides(raw, parsed, model_keys=MODEL_KEYS)
    return Experiment.from_dict(raw, base_dir=path.parent.absolute())


def flatten_params(experiment: Experiment) -> dict[str, str]:
    """Dotted key -> string for MLflow params, secrets masked by ``knet_platform.redaction`` (values of
    keys like password/token/secret, ``user:pass@`` and ``?token=...`` inside URIs)."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item)
            return
        leaf = prefix.rsplit(".", 1)[-1]
        if is_secret_key(leaf) and value not in (None, ""):
            flat[prefix] = MASK
        else:
            flat[prefix] = redact_text(str(value))

    walk("", experiment.to_dict())
    return flat


# ---- strict building from dicts ------------------------------------------------------------


def _is_uri(value: str) -> bool:
    """``models:/...``, ``runs:/...``, ``mlflow-artifacts:/...`` or any ``scheme://``, not a local path."""
    return "://" in value or value.startswith(("models:/", "runs:/", "mlflow-artifacts:/"))


def _absolute(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (base / path).resolve()

"""The experiment YAML as validating dataclasses: one file describes data, model, training, scaling,
tracking and (optionally) a Tune search. The sections are in ``sections.py`` and ``model_section.py``;
this module builds the whole experiment and checks what needs several sections at once.

Everything is checked here, before Ray, MLflow or torch do anything expensive: unknown keys (with a
did-you-mean and the dotted path), wrong types, missing local data paths, impossible combinations.
Every problem raises one ``ExperimentError`` naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from knet_platform.experiment.building import ExperimentError, build, plain_fields, require
from knet_platform.experiment.home import local_path
from knet_platform.experiment.model_section import INIT_FROM, ModelSection
from knet_platform.experiment.overrides import (
    apply_overrides,
    parse_override,
    yaml_error_cause,
    yaml_error_location,
)
from knet_platform.experiment.sections import (
    DataConfig,
    ScalingConfig,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
)
from knet_platform.experiment.yaml_loader import load_yaml
from knet_platform.knet_adapter import KNetConfig, model_keys
from knet_platform.redaction import MASK, is_secret_key, redact_text

if TYPE_CHECKING:
    from knet_platform.knet_adapter import CategoryTable

Task = Literal["panoptic", "instance", "semantic"]
SYNTHETIC_PLACEHOLDER = "{synthetic}"  # in data paths: replaced by data.synthetic.cache_dir
_PATH_FIELDS = ("images", "annotations", "masks", "shards")


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

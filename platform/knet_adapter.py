"""The one place the training platform calls ``knet``'s model, data, evaluation and bundle API.

Everything else in the platform handles Ray and MLflow; if ``knet``'s public API changes, this is
the file to update (the role DETR's ``d2/`` adapter plays).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from knet import build_model
from knet.bundle import save_bundle
from knet.data import DataSource, build_dataset, synthesize
from knet.data.parquet import load_manifest
from knet.evaluation import InstanceEvaluator, PanopticEvaluator, SemanticEvaluator

if TYPE_CHECKING:
    from knet_platform.experiment.schema import Experiment

    from knet import KNetConfig
    from knet.data import CategoryTable

# DataSource fields that name files or folders (checked before training, synthesised when missing)
_PATH_FIELDS = ("images", "annotations", "masks", "shards")


@dataclass
class Datasets:
    """train / val map-style datasets (items: image (3, h, w) float, target dict, meta dict)."""

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset | None
    categories: CategoryTable


def prepare_data(experiment: Experiment) -> bool:
    """On the driver, before any worker starts: generate the synthetic dataset into its cache folder
    when the experiment asks for it and the files are not there yet. Returns True if it generated.

    The experiment's ``data.train`` / ``data.val`` must point into ``data.synthetic.cache_dir``; after
    generation every path they name must exist, otherwise this raises naming the missing path.
    """
    data = experiment.data
    if data.train is None:
        raise ValueError(
            "data.train is not set. Point it at a dataset (a DataSource), or at the synthetic "
            "dataset's files inside data.synthetic.cache_dir."
        )
    missing = _missing_paths(experiment)
    if not missing:
        return False
    synthetic = data.synthetic
    if synthetic is None:
        raise FileNotFoundError(
            f"data paths do not exist: {', '.join(missing)}. Fix the paths in the experiment YAML "
            "(relative paths are resolved against the YAML's folder) or add a data.synthetic section."
        )
    synthesize(
        synthetic.cache_dir,
        num_images=synthetic.num_images,
        seed=synthetic.seed,
        image_size=tuple(synthetic.image_size),
    )
    still_missing = _missing_paths(experiment)
    if still_missing:
        raise FileNotFoundError(
            f"generated the synthetic dataset into {synthetic.cache_dir}, but {', '.join(still_missing)} "
            "still do not exist: point data.train / data.val at files inside data.synthetic.cache_dir."
        )
    return True


def build_datasets(experiment: Experiment) -> Datasets:
    """The experiment's train and val datasets (val is None when the experiment has none).

    Val is built with the train split's category table, so class ids mean the same in both (a
    semantic split without a categories JSON would otherwise number only the labels it holds; other
    formats must list the same categories, else a DataError names the val file).
    """
    data = experiment.data
    train = build_dataset(data.train, data.transforms, train=True)
    val = None
    if data.val is not None:
        val = build_dataset(data.val, data.transforms, train=False, categories=train.categories)
    return Datasets(train=train, val=val, categories=train.categories)


def build_knet(experiment: Experiment, categories: CategoryTable) -> tuple[nn.Module, KNetConfig]:
    """The K-Net model for this experiment, class counts filled from the dataset's categories."""
    model_config = experiment.model_config(categories)
    return build_model(model_config), model_config


def build_evaluators(model_config: KNetConfig, class_names: list[str] | None = None) -> dict[str, Any]:
    """One evaluator per prediction part the model produces, keyed by that part's name; per-class
    results are keyed by ``class_names`` (contiguous order, things first), when given."""
    things, stuff = model_config.num_thing_classes, model_config.num_stuff_classes
    inference = model_config.inference
    evaluators: dict[str, Any] = {}
    if inference.panoptic_on:
        evaluators["panoptic"] = PanopticEvaluator(
            num_thing_classes=things, num_stuff_classes=stuff, class_names=class_names
        )
    if inference.instance_on and things > 0:
        evaluators["instance"] = InstanceEvaluator(
            num_thing_classes=things, class_names=class_names[:things] if class_names is not None else None
        )
    if inference.semantic_on:
        evaluators["semantic"] = SemanticEvaluator(num_classes=things + stuff, class_names=class_names)
    if not evaluators:
        raise ValueError("model.inference switches every output off (panoptic_on/instance_on/semantic_on)")
    return evaluators


def write_bundle(
    directory: str | Path,
    experiment: Experiment,
    categories: CategoryTable,
    model_state: dict[str, torch.Tensor],
) -> Path:
    """A ``knet.bundle`` folder (weights + model config + inference settings) from trained weights;
    it records the training data's ``reduce_zero_label`` so predictions are written in its label ids."""
    model, model_config = build_knet(experiment, categories)
    model.load_state_dict(model_state)
    model.eval()
    save_bundle(
        directory,
        model,
        model_config,
        categories,
        experiment.data.transforms,
        reduce_zero_label=_reduces_zero_label(experiment.data.train),
    )
    return Path(directory)


def _reduces_zero_label(source: DataSource) -> bool:
    """Whether the training labels are ADE20K-style (dataset id = category id + 1), for packed shards
    as their manifest recorded it."""
    if source.format == "parquet" and source.shards is not None:
        return load_manifest(source.shards).reduce_zero_label
    return source.reduce_zero_label


def denormalize(image: torch.Tensor, experiment: Experiment, size: tuple[int, int]) -> np.ndarray:
    """(3, H, W) normalised float image -> (h, w, 3) uint8 RGB, cropped to its unpadded ``size``."""
    transforms = experiment.data.transforms
    mean = torch.tensor(transforms.mean, dtype=image.dtype, device=image.device)[:, None, None]
    std = torch.tensor(transforms.std, dtype=image.dtype, device=image.device)[:, None, None]
    rgb = (image[:, : size[0], : size[1]] * std + mean).clamp(0, 255)
    return rgb.permute(1, 2, 0).to(torch.uint8).cpu().numpy()  # (3, h, w) -> (h, w, 3)


def _missing_paths(experiment: Experiment) -> list[str]:
    missing = []
    for split in ("train", "val"):
        source = getattr(experiment.data, split)
        if source is None:
            continue
        for field_name in _PATH_FIELDS:
            value = getattr(source, field_name, None)
            if value and "://" not in str(value) and not Path(value).exists():
                missing.append(f"data.{split}.{field_name}={value}")
    return missing

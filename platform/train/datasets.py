"""The experiment's datasets: generated on the driver before training when synthetic, opened on every
Train worker (and on the driver wherever it needs the data's categories)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knet_platform.errors import KnetUserError
from knet_platform.experiment.building import ExperimentError
from knet_platform.experiment.schema import Experiment
from knet_platform.knet_adapter import CategoryTable, build_dataset, synthesize
from torch.utils.data import ConcatDataset

# DataSource fields that name files or folders (checked before training, synthesised when missing)
_PATH_FIELDS = ("images", "annotations", "masks", "shards")


class DataPathError(KnetUserError, FileNotFoundError):
    """A path of ``data.train`` / ``data.val`` does not exist (and generating the synthetic set did not
    create it)."""


@dataclass
class Datasets:
    """train / val map-style datasets (items: image (3, h, w) float, target dict, meta dict)."""

    train: Any  # a torch Dataset
    val: Any | None
    categories: CategoryTable


def prepare_data(experiment: Experiment) -> bool:
    """On the driver, before any worker starts: generate the synthetic dataset into its cache folder
    when the experiment asks for it and the files are not there yet. Returns True if it generated.

    The experiment's ``data.train`` / ``data.val`` must point into ``data.synthetic.cache_dir``; after
    generation every path they name must exist, otherwise this raises naming the missing path.
    """
    data = experiment.data
    if data.train is None:
        raise ExperimentError(
            "data.train is not set. Point it at a dataset (a DataSource), or at the synthetic "
            "dataset's files inside data.synthetic.cache_dir."
        )
    missing = _missing_paths(experiment)
    if not missing:
        return False
    synthetic = data.synthetic
    if synthetic is None:
        raise DataPathError(
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
        raise DataPathError(
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
    train = build_dataset(data.train, data.transforms, train=True, seed=experiment.train.seed)
    categories = train.categories
    if data.repeat > 1:  # each repetition is augmented afresh: a small dataset gives longer epochs
        train = ConcatDataset([_reseeded(train, experiment.train.seed, r) for r in range(data.repeat)])
    val = None
    if data.val is not None:
        val = build_dataset(data.val, data.transforms, train=False, categories=categories)
    return Datasets(train=train, val=val, categories=categories)


def set_train_epoch(train: Any, epoch: int) -> None:
    """Give the train split's augmentation the epoch (each epoch crops and flips afresh)."""
    for dataset in getattr(train, "datasets", [train]):  # a ConcatDataset of repetitions, or one
        dataset.set_epoch(epoch)


def _reseeded(dataset: Any, seed: int, repetition: int) -> Any:
    """A view of ``dataset`` (the same reader) whose augmentation seed is the repetition's own."""
    view = copy.copy(dataset)
    view.seed = seed * 1_009 + repetition
    return view


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

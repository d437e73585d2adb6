"""The one module of ``knet_platform`` that imports ``knet``: the model, data, evaluation and bundle API
the platform uses, and the few compositions of it the platform needs.

Everything else in the platform handles YAML, Ray and MLflow and reaches ``knet`` through the names
here (a test enforces it), so a change of ``knet``'s public API is mended in this file alone (the role
DETR's ``d2/`` adapter plays). It takes ``knet`` types and plain values, never the platform's
``Experiment``, so nothing here depends on the platform.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Light: what an experiment file is validated against loads without torch, so a bad YAML is reported
# in a fraction of a second (``knet show-config``). Everything else is imported on first use below.
from knet.config import ConfigFieldError, KNetConfig
from knet.data.config import DataSource, TransformConfig
from knet.errors import KnetInputError
from knet.typed_config import build as build_config
from knet.typed_config import plain, plain_fields

_HEAVY = {
    "build_model": ("knet.build", "build_model"),
    "ModelBundle": ("knet.bundle", "ModelBundle"),
    "load_bundle": ("knet.bundle", "load_bundle"),
    "CategoryTable": ("knet.data.categories", "CategoryTable"),
    "build_dataset": ("knet.data.dataset", "build_dataset"),
    "collate_batch": ("knet.data.dataset", "collate_batch"),
    "synthesize": ("knet.data.synthetic", "synthesize"),
    "check_dataset": ("knet.data.check", "check_dataset"),
    "detect_source": ("knet.data.check", "detect_source"),
    "decode_image": ("knet.data.io", "read_rgb"),
    "pack_dataset": ("knet.data.parquet", "pack_dataset"),
    "load_manifest": ("knet.data.parquet", "load_manifest"),
    "ShardStore": ("knet.data.shard_store", "ShardStore"),
    "contiguous_share": ("knet.data.streaming", "contiguous_share"),
    "decode_sample": ("knet.data.streaming", "decode_sample"),
    "encode_sample": ("knet.data.streaming", "encode_sample"),
    "prepare_train_row": ("knet.data.streaming", "prepare_train_row"),
    "shard_epoch_order": ("knet.data.streaming", "shard_epoch_order"),
    "shard_row_groups": ("knet.data.streaming", "shard_row_groups"),
    "denormalize": ("knet.data.transforms", "denormalize"),
    "CocoInstanceResultsWriter": ("knet.evaluation", "CocoInstanceResultsWriter"),
    "EvaluationResult": ("knet.evaluation", "EvaluationResult"),
    "PanopticResultsWriter": ("knet.evaluation", "PanopticResultsWriter"),
    "build_evaluators": ("knet.evaluation", "build_evaluators"),
    "evaluate": ("knet.evaluation", "evaluate"),
    "evaluate_results": ("knet.evaluation", "evaluate_results"),
    "write_semantic_png": ("knet.evaluation", "write_semantic_png"),
    "UnsafeWeightsError": ("knet.safe_load", "UnsafeWeightsError"),
    "load_tensors": ("knet.safe_load", "load_tensors"),
    "known_categories": ("knet.data.known_categories", "known_categories"),
    "load_official": ("knet.weights", "load_official"),
    "bundle_config": ("knet.weights.transfer", "bundle_config"),
    "check_transferable": ("knet.weights.transfer", "check_transferable"),
    "transfer_from_bundle": ("knet.weights.transfer", "transfer_from_bundle"),
    "Prediction": ("knet.structures", "Prediction"),
    "to_device": ("knet.structures", "to_device"),
    "render_overlay": ("knet.visualize", "render_overlay"),
}

if TYPE_CHECKING:
    from torch import nn

    from knet import build_model
    from knet.bundle import ModelBundle, load_bundle
    from knet.data.categories import CategoryTable
    from knet.data.check import check_dataset, detect_source
    from knet.data.dataset import build_dataset, collate_batch
    from knet.data.io import read_rgb as decode_image
    from knet.data.known_categories import known_categories
    from knet.data.parquet import load_manifest, pack_dataset
    from knet.data.shard_store import ShardStore
    from knet.data.streaming import (
        contiguous_share,
        decode_sample,
        encode_sample,
        prepare_train_row,
        shard_epoch_order,
        shard_row_groups,
    )
    from knet.data.synthetic import synthesize
    from knet.data.transforms import denormalize
    from knet.evaluation import (
        CocoInstanceResultsWriter,
        EvaluationResult,
        PanopticResultsWriter,
        build_evaluators,
        evaluate,
        evaluate_results,
        write_semantic_png,
    )
    from knet.safe_load import UnsafeWeightsError, load_tensors
    from knet.structures import Prediction, to_device
    from knet.visualize import render_overlay
    from knet.weights import load_official
    from knet.weights.transfer import bundle_config, check_transferable, transfer_from_bundle


def __getattr__(name: str) -> Any:
    """The heavy names (torch, timm, pycocotools behind them), imported when first used."""
    if name not in _HEAVY:
        raise AttributeError(f"module 'knet_platform.knet_adapter' has no attribute {name!r}")
    module, attribute = _HEAVY[name]
    return getattr(importlib.import_module(module), attribute)


__all__ = [
    "CategoryTable",
    "CocoInstanceResultsWriter",
    "ConfigFieldError",
    "DataSource",
    "EvaluationResult",
    "KnetInputError",
    "UnsafeWeightsError",
    "KNetConfig",
    "ModelBundle",
    "PanopticResultsWriter",
    "Prediction",
    "TransformConfig",
    "build_dataset",
    "build_config",
    "build_evaluators",
    "build_model",
    "bundle_config",
    "check_dataset",
    "check_model_builds",
    "check_transferable",
    "collate_batch",
    "decode_image",
    "denormalize",
    "detect_source",
    "evaluate",
    "evaluate_results",
    "known_categories",
    "load_bundle",
    "load_official",
    "load_tensors",
    "model_config_for_task",
    "model_keys",
    "pack_dataset",
    "load_manifest",
    "ShardStore",
    "contiguous_share",
    "decode_sample",
    "encode_sample",
    "prepare_train_row",
    "shard_epoch_order",
    "shard_row_groups",
    "plain",
    "plain_fields",
    "reduces_zero_label",
    "render_overlay",
    "synthesize",
    "to_device",
    "transfer_from_bundle",
    "used_model_fields",
    "with_class_counts",
    "write_bundle",
    "write_semantic_png",
]

# Class counts a model section is validated with before the dataset is known (each task's minimum).
PLACEHOLDER_COUNTS = {"panoptic": (1, 1), "instance": (1, 0), "semantic": (0, 2)}


def model_config_for_task(task: str, section: dict[str, Any]) -> KNetConfig:
    """The task's paper preset with the experiment's ``model`` section over it. Class counts the
    section does not give are placeholders until :func:`with_class_counts` fills in the dataset's.

    Raises ConfigFieldError (a key of the section with a wrong type) or ValueError (a bad value).
    """
    section = dict(section)
    placeholder_things, placeholder_stuff = PLACEHOLDER_COUNTS[task]
    things = section.pop("num_thing_classes", None)
    stuff = section.pop("num_stuff_classes", None)
    things = placeholder_things if things is None else things
    stuff = placeholder_stuff if stuff is None else stuff
    backbone = section.pop("backbone", None)  # None: the reference backbone of the task (knet presets)
    return KNetConfig.for_task(
        task, num_thing_classes=things, num_stuff_classes=stuff, backbone=backbone, **section
    )


def with_class_counts(config: KNetConfig, categories: CategoryTable) -> KNetConfig:
    """``config`` with the dataset's thing and stuff class counts (validated again)."""
    return KNetConfig.from_dict(
        {
            **config.to_dict(),
            "num_thing_classes": categories.num_thing_classes,
            "num_stuff_classes": categories.num_stuff_classes,
        }
    )


def model_keys(config: KNetConfig) -> set[str]:
    """Every dotted key of a model section (``num_proposals``, ``update``, ``update.num_heads``...)."""
    keys: set[str] = set()

    def walk(prefix: str, value: Any) -> None:
        if prefix:
            keys.add(prefix)
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else key, item)

    walk("", config.to_dict())
    return keys


# Model keys a task's model never reads (knet.build: the semantic variant has fixed class kernels, no
# matching and its own criterion and post-processor; the mask variants have no decode or aux head;
# the instance model has no rank loss).
_UNUSED_BY_TASK: dict[str, tuple[str, ...]] = {
    "semantic": (
        "num_proposals", "matcher", "loss.cls_weight", "loss.mask_weight", "loss.dice_weight",
        "loss.rank_weight", "inference.max_per_image", "inference.mask_thr",
        "inference.instance_score_thr", "inference.overlap_thr",
    ),
    "panoptic": ("decode_head", "aux_head", "loss.aux_weight"),
    "instance": ("decode_head", "aux_head", "loss.aux_weight", "loss.rank_weight", "inference.overlap_thr"),
}  # fmt: skip


def used_model_fields(config: KNetConfig) -> dict[str, Any]:
    """``config`` as a dict without the keys its task never reads (what ``knet show-config`` prints)."""
    fields = config.to_dict()
    for dotted in _UNUSED_BY_TASK[config.task]:
        *sections, key = dotted.split(".")
        owner = fields
        for section in sections:
            owner = owner[section]
        owner.pop(key)
    return fields


def write_bundle(
    directory: str | Path,
    model: nn.Module,
    model_config: KNetConfig,
    categories: CategoryTable,
    transforms: TransformConfig,
    *,
    reduce_zero_label: bool,
) -> Path:
    """A ``knet.bundle`` folder (weights + model config + categories + test transforms) of ``model``."""
    from knet.bundle import save_bundle

    return save_bundle(
        directory, model, model_config, categories, transforms, reduce_zero_label=reduce_zero_label
    )


def check_model_builds(config: KNetConfig) -> None:
    """Build the model on the meta device (no memory, no compute): an unknown backbone, a missing or
    unreadable ``backbone.pretrained_path`` or shapes that do not fit fail here, before any worker."""
    import torch

    from knet import build_model

    with torch.device("meta"):
        build_model(config)


def reduces_zero_label(source: DataSource) -> bool:
    """Whether the training labels are ADE20K-style (dataset id = category id + 1), for packed shards
    as their manifest recorded it."""
    if source.format == "parquet" and source.shards is not None:
        from knet.data.parquet import load_manifest

        return load_manifest(source.shards).reduce_zero_label
    return source.reduce_zero_label

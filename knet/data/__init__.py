"""Datasets for K-Net: readers, transforms, synthetic generator, Parquet packing (docs/interfaces.md §3).

The names below are imported on first use, so ``knet.data.config`` (what an experiment file is checked
against) loads without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOMES = {
    "Category": "knet.data.categories",
    "CategoryTable": "knet.data.categories",
    "DatasetReport": "knet.data.check",
    "check_dataset": "knet.data.check",
    "detect_source": "knet.data.check",
    "DataSource": "knet.data.config",
    "TransformConfig": "knet.data.config",
    "Batch": "knet.data.dataset",
    "KNetDataset": "knet.data.dataset",
    "build_dataset": "knet.data.dataset",
    "collate_batch": "knet.data.dataset",
    "DataError": "knet.data.errors",
    "Manifest": "knet.data.parquet",
    "pack_dataset": "knet.data.parquet",
    "SyntheticDataset": "knet.data.synthetic",
    "render_scene": "knet.data.synthetic",
    "synthesize": "knet.data.synthetic",
}

__all__ = [
    "Batch",
    "Category",
    "CategoryTable",
    "DataError",
    "DataSource",
    "DatasetReport",
    "KNetDataset",
    "Manifest",
    "SyntheticDataset",
    "TransformConfig",
    "build_dataset",
    "check_dataset",
    "collate_batch",
    "detect_source",
    "pack_dataset",
    "render_scene",
    "synthesize",
]

if TYPE_CHECKING:
    from knet.data.categories import Category, CategoryTable
    from knet.data.check import DatasetReport, check_dataset, detect_source
    from knet.data.config import DataSource, TransformConfig
    from knet.data.dataset import Batch, KNetDataset, build_dataset, collate_batch
    from knet.data.errors import DataError
    from knet.data.parquet import Manifest, pack_dataset
    from knet.data.synthetic import SyntheticDataset, render_scene, synthesize


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'knet.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)

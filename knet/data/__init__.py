"""Datasets for K-Net: readers, transforms, synthetic generator, Parquet packing (docs/interfaces.md §3)."""

from __future__ import annotations

from knet.data.categories import Category, CategoryTable
from knet.data.check import DatasetReport, check_dataset, detect_source
from knet.data.config import DataSource, TransformConfig
from knet.data.dataset import Batch, KNetDataset, build_dataset, collate_batch
from knet.data.errors import DataError
from knet.data.parquet import Manifest, pack_dataset
from knet.data.synthetic import SyntheticDataset, render_scene, synthesize

__all__ = [
    "Batch",
    "Category",
    "CategoryTable",
    "DataError",
    "DatasetReport",
    "Manifest",
    "DataSource",
    "KNetDataset",
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

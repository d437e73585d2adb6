"""Ray Data ingest of a packed (Parquet) train split: read, decode and augment in Ray tasks, each row
once per epoch across the Train workers, in a seeded order that differs from epoch to epoch.

The pieces, in the order a row travels (docs/data-ingest.md):

1. :class:`ShardDatasource` plans one read task per shard (and per ``data.repeat`` repetition) in the
   order ``shard_epoch_order(seed, epoch)`` gives. A task reads its shard once, checks its sha256
   against the manifest (a mismatch is one ``DataError`` naming the shard) and yields its row groups
   as blocks in a seeded order. The epoch is ``first_epoch`` plus the number of times the dataset has
   been executed (Ray Data counts executions in the dataset's context; Train executes it once per
   epoch), so a resumed run continues with the order of the epoch it resumes at.
2. ``map_batches(prepare_rows)`` decodes and augments each row (uint8 image, packed masks).
3. Ray Train splits the stream between workers (``streaming_split(equal=True)``); with
   ``preserve_order`` and no locality hints the split is a function of the order, so a seed gives the
   same rows to the same ranks on the same cluster shape. Equal splits leave out the last
   ``rows % workers`` rows of an epoch (other rows each epoch, as the order changes).
4. Each worker shuffles locally (``shuffle_buffer_rows``, seeded by seed, epoch and rank) and collates.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import ray.data
from knet_platform.knet_adapter import (
    CategoryTable,
    ShardStore,
    collate_batch,
    decode_sample,
    encode_sample,
    load_manifest,
    prepare_train_row,
    shard_epoch_order,
    shard_row_groups,
)
from knet_platform.ray_runtime import CapacityError
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

if TYPE_CHECKING:
    from knet_platform.experiment.schema import Experiment
    from knet_platform.knet_adapter import Batch, TransformConfig
    from ray.data import DataIterator
    from ray.train import DataConfig

TRAIN = "train"  # the dataset's name in TorchTrainer(datasets=...) and get_dataset_shard
_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints


class ShardDatasource(Datasource):
    """The shards of one manifest as a Ray Data source; see the module docstring for the order."""

    def __init__(self, uri: str, *, seed: int, first_epoch: int, repeat: int, shuffle: bool = True) -> None:
        self._uri = str(uri)
        self._shuffle = shuffle
        self.manifest = load_manifest(self._uri)
        self._shards = self.manifest.shards
        self._seed, self._first_epoch, self._repeat = seed, first_epoch, repeat
        # the executions the driver's context counted before this dataset existed are not epochs
        self._executions_before = ray.data.DataContext.get_current()._execution_idx

    def estimate_inmemory_data_size(self) -> int | None:
        sizes = [shard.num_bytes for shard in self._shards]
        return None if None in sizes else self._repeat * sum(sizes)

    def epoch(self, data_context: ray.data.DataContext | None) -> int:
        executions = data_context._execution_idx if data_context is not None else 0
        return self._first_epoch + max(executions - self._executions_before, 0)

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        epoch = self.epoch(data_context)
        tasks = []
        order = shard_epoch_order(len(self._shards), self._repeat, self._seed, epoch, shuffle=self._shuffle)
        for repetition, shard in order:
            info = self._shards[shard]
            metadata = BlockMetadata(
                num_rows=info.num_rows, size_bytes=info.num_bytes, input_files=[info.path], exec_stats=None
            )
            read = _ShardRead(self._uri, self._shards, shard, repetition, self._seed, epoch, self._shuffle)
            tasks.append(ReadTask(read, metadata, per_task_row_limit=per_task_row_limit))
        return tasks


class _ShardRead:
    """One read task's function (a class, so it pickles without the datasource)."""

    def __init__(
        self, uri: str, shards: list[Any], shard: int, repetition: int, seed: int, epoch: int, shuffle: bool
    ) -> None:
        self.uri, self.shards, self.shard = uri, shards, shard
        self.repetition, self.seed, self.epoch, self.shuffle = repetition, seed, epoch, shuffle

    def __call__(self) -> Iterator[pa.Table]:
        store = ShardStore(self.uri, self.shards)
        yield from shard_row_groups(
            store,
            self.shard,
            repetition=self.repetition,
            seed=self.seed,
            epoch=self.epoch,
            shuffle=self.shuffle,
        )


def prepare_rows(
    table: pa.Table, *, uri: str, seed: int, categories: CategoryTable, transforms: TransformConfig
) -> pa.Table:
    """A Ray Data map: shard rows -> ``row_index``, ``epoch`` and the encoded train ``sample``."""
    samples = []
    for row in table.to_pylist():
        name = f"{uri} row {row['row_index']} ({row['file_name']})"
        sample = prepare_train_row(
            row, index=row["row_index"], epoch=row["epoch"], seed=seed,
            categories=categories, transforms=transforms, name=name,
        )  # fmt: skip
        samples.append(encode_sample(sample))
    return pa.table(
        {
            "row_index": table.column("row_index"),
            "epoch": table.column("epoch"),
            "sample": pa.array(samples, pa.binary()),
        }
    )


def train_dataset(experiment: Experiment, first_epoch: int, *, shuffle: bool = True) -> ray.data.Dataset:
    """The experiment's Parquet train split as a Ray Data dataset of prepared samples, its order
    starting at ``first_epoch``'s (``shuffle=False``: storage order, for benchmarks)."""
    data, ingest = experiment.data, experiment.data.ingest
    source = ShardDatasource(
        data.train.shards,
        seed=experiment.train.seed,
        first_epoch=first_epoch,
        repeat=data.repeat,
        shuffle=shuffle,
    )
    categories = CategoryTable.from_dict(source.manifest.categories)
    dataset = ray.data.read_datasource(source, num_cpus=ingest.cpus_per_task)
    dataset.context.enable_progress_bars = False  # a bar redrawn per block, through every worker's log
    return dataset.map_batches(
        prepare_rows,
        batch_format="pyarrow",
        batch_size=None,  # one block (a row group) per call
        num_cpus=ingest.cpus_per_task,
        fn_kwargs={
            "uri": str(data.train.shards),
            "seed": experiment.train.seed,
            "categories": categories,
            "transforms": data.transforms,
        },
    )


def data_config(names: tuple[str, ...] = (TRAIN,)) -> DataConfig:
    """Split the datasets ``names`` (the train set) deterministically: the stream's order kept, no
    locality hints (a block's node would decide which worker gets it)."""
    from ray.data import DataContext, ExecutionOptions
    from ray.train import DataConfig

    # not DataConfig.default_ingest_options(): it passes exclude_resources, deprecated in Ray 2.60
    limits = DataContext.get_current().execution_options.resource_limits
    options = ExecutionOptions(resource_limits=limits, preserve_order=True)
    return DataConfig(datasets_to_split=list(names), execution_options=options, enable_shard_locality=False)


def local_ray_cpus(experiment: Experiment) -> int | None:
    """Logical CPUs for a local Ray (None: Ray counts the cores). Ray Data's tasks need CPUs beside the
    ones Train reserves for its workers; on one machine they share the cores, as DataLoader processes
    would, so the local Ray counts the workers' CPUs plus two tasks' (a read and a decode)."""
    if not experiment.data.streams_train:
        return None
    scaling = experiment.scaling
    workers = scaling.num_workers * float(scaling.resources_per_worker.get("CPU", 1.0))
    return max(os.cpu_count() or 1, math.ceil(workers + 2 * experiment.data.ingest.cpus_per_task))


def check_ingest_capacity(experiment: Experiment) -> None:
    """Refuse, before training, a cluster with no CPU left for Ray Data beside the Train workers (the
    run would wait for a read task forever)."""
    if not experiment.data.streams_train:
        return
    total = sum(node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive"))
    scaling, needed = experiment.scaling, experiment.data.ingest.cpus_per_task
    workers = scaling.num_workers * float(scaling.resources_per_worker.get("CPU", 1.0))
    if total - workers < needed:
        raise CapacityError(
            f"data.ingest: Ray Data streams the train split in tasks of {needed:g} CPU, but the "
            f"cluster's {total:g} CPUs all go to the {scaling.num_workers} Train workers ({workers:g}). "
            "Add a CPU node, lower scaling.resources_per_worker.CPU or data.ingest.cpus_per_task, or "
            "set data.ingest.engine: dataloader."
        )


def rows_per_worker(experiment: Experiment, world_size: int) -> int:
    """Rows each worker receives per epoch (equal splits drop the remainder)."""
    shards = load_manifest(experiment.data.train.shards).shards
    return experiment.data.repeat * sum(shard.num_rows for shard in shards) // world_size


def iter_train_batches(
    shard: DataIterator, experiment: Experiment, *, epoch: int, rank: int, world_size: int
) -> Iterator[tuple[Batch, np.ndarray, np.ndarray]]:
    """This worker's collated batches of one epoch, each with its rows' ``row_index`` and ``epoch``."""
    ingest, train = experiment.data.ingest, experiment.train
    batches = shard.iter_batches(
        batch_size=train.batch_size,
        batch_format="pyarrow",
        prefetch_batches=ingest.prefetch_batches,
        local_shuffle_buffer_size=ingest.shuffle_buffer_rows or None,
        local_shuffle_seed=(train.seed * 100_003 + epoch) * max(world_size, 1) + rank,
        drop_last=False,
    )
    transforms = experiment.data.transforms
    for table in batches:
        samples = [decode_sample(data, transforms) for data in table.column("sample").to_pylist()]
        rows = table.column("row_index").to_numpy()
        epochs = table.column("epoch").to_numpy()
        yield collate_batch(samples), rows, epochs


def resume_epoch(storage_path: str, run_name: str) -> int:
    """The epoch a run of this name under ``storage_path`` resumes after (0 for a new run): the
    ``epoch`` its latest checkpoint reported, from Ray Train's checkpoint record."""
    import fsspec

    path = f"{storage_path.rstrip('/')}/{run_name}/{_SNAPSHOT}"
    fs, local = fsspec.core.url_to_fs(path)
    if not fs.exists(local):
        return 0
    with fs.open(local, "r") as handle:
        latest = json.load(handle).get("latest_checkpoint_result") or {}
    epoch = (latest.get("metrics") or {}).get("epoch")
    if isinstance(epoch, (int, float)):
        return int(epoch)
    found = re.search(r"checkpoint_epoch_(\d+)", str(latest.get("checkpoint_dir_name", "")))
    return int(found.group(1)) if found else 0

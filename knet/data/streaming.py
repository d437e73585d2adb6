"""Training samples made from packed shard rows in one process and trained on in another.

A streaming ingest (e.g. Ray Data map tasks) decodes and augments rows away from the training step,
so every sample crosses a process boundary. :func:`encode_sample` keeps that crossing small: the
image stays uint8 (normalised by :func:`decode_sample`, on the consumer's side) and boolean masks are
packed 8 pixels to a byte, about a tenth of the float tensors a map-style dataset yields. The bytes
are ``torch.save`` output read back with ``weights_only=True``: tensors and plain values only.

Augmentation is seeded by ``(seed, epoch, index)`` exactly as :class:`knet.data.KNetDataset` seeds
it, so a row gets the same crop and flip whichever process prepares it.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from knet.data.categories import CategoryTable
from knet.data.config import TransformConfig
from knet.data.dataset import augmentation_seed
from knet.data.parquet import decode_row
from knet.data.readers import Sample
from knet.data.shard_store import ShardStore
from knet.data.transforms import normalize, train_geometry

_PACKED = "__packed_bool__"  # marks a boolean tensor stored as packbits + shape


def prepare_train_row(
    row: dict[str, Any],
    *,
    index: int,
    epoch: int,
    seed: int,
    categories: CategoryTable,
    transforms: TransformConfig,
    name: str,
) -> Sample:
    """Row ``index`` of a packed dataset, decoded and augmented for ``epoch``: (uint8 image (3, h, w),
    target, meta). ``name`` locates the row in a ``DataError``."""
    image, target, meta = decode_row(row, categories, name)
    generator = torch.Generator().manual_seed(augmentation_seed(seed, epoch, index))
    image, target, info = train_geometry(image, target, transforms, generator)
    return image, target, {**meta, **info}


def encode_sample(sample: Sample) -> bytes:
    """``sample`` (uint8 image) as compact bytes for :func:`decode_sample`."""
    image, target, meta = sample
    if image.dtype != torch.uint8:
        raise TypeError(f"encode_sample takes the uint8 image before normalising, got {image.dtype}")
    packed = {key: _pack(value) for key, value in target.items()}
    buffer = io.BytesIO()
    torch.save({"image": image.contiguous(), "target": packed, "meta": meta}, buffer)
    return buffer.getvalue()


def decode_sample(data: bytes, transforms: TransformConfig) -> Sample:
    """The sample :func:`encode_sample` wrote, its image normalised with ``transforms``' mean and std:
    what ``KNetDataset`` yields for a train item."""
    stored = torch.load(io.BytesIO(data), weights_only=True)
    target = {key: _unpack(value) for key, value in stored["target"].items()}
    return normalize(stored["image"], transforms.mean, transforms.std), target, stored["meta"]


def _pack(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool and value.dim() > 0:
        bits = np.packbits(value.numpy().reshape(-1))
        return {_PACKED: torch.from_numpy(bits), "shape": tuple(value.shape)}
    return value


def _unpack(value: Any) -> Any:
    if isinstance(value, dict) and _PACKED in value:
        shape = tuple(value["shape"])
        count = int(np.prod(shape))
        bits = np.unpackbits(value[_PACKED].numpy(), count=count)
        return torch.from_numpy(bits.astype(bool)).reshape(shape)
    return value


def shard_epoch_order(
    num_shards: int, repeat: int, seed: int, epoch: int, *, shuffle: bool = True
) -> list[tuple[int, int]]:
    """The order an epoch reads shards in: ``(repetition, shard)`` pairs permuted by ``(seed, epoch)``
    (storage order without ``shuffle``); the same in every process, different from epoch to epoch."""
    pairs = [(r, k) for r in range(repeat) for k in range(num_shards)]
    if not shuffle:
        return pairs
    order = np.random.default_rng([seed, epoch, 0]).permutation(len(pairs))
    return [pairs[i] for i in order]


def shard_row_groups(
    store: ShardStore, shard: int, *, repetition: int, seed: int, epoch: int, shuffle: bool = True
) -> Iterator[pa.Table]:
    """Shard ``shard``'s row groups from one checked read (sha256 against the manifest, a mismatch a
    ``DataError`` naming the shard); with ``shuffle``, the groups and the rows within each group in
    orders permuted by ``(seed, epoch, repetition, shard)`` (free here: the rows are in memory
    anyway, and a consumer's shuffle buffer can then stay small).

    Each table gains ``row_index`` (the row's dataset index; repetition ``r`` of ``N`` rows counts
    from ``r * N``, so its augmentation differs) and ``epoch`` (whose order and augmentation it has).
    """
    groups = list(store.read_shard(shard))
    rng = np.random.default_rng([seed, epoch, 1 + repetition, shard])
    order = rng.permutation(len(groups)) if shuffle else np.arange(len(groups))
    starts = np.cumsum([0, *(len(g) for g in groups)])
    first = repetition * len(store) + store.shard_start(shard)
    for g in order:
        table = groups[g]
        rows = np.arange(first + starts[g], first + starts[g] + len(table), dtype=np.int64)
        table = table.append_column("row_index", pa.array(rows))
        table = table.append_column("epoch", pa.array(np.full(len(table), epoch, dtype=np.int64)))
        yield table.take(rng.permutation(len(table))) if shuffle else table


def contiguous_share(num_items: int, rank: int, world_size: int) -> range:
    """Rank ``rank``'s contiguous block of ``range(num_items)``: blocks cover every item exactly once
    and differ in length by at most one (no padding, so no item is scored twice). Contiguous, so a
    packed dataset's rank reads its own row groups only."""
    start = num_items * rank // world_size
    return range(start, num_items * (rank + 1) // world_size)


def row_indices(tables: Sequence[pa.Table]) -> list[int]:
    """The ``row_index`` column of ``tables``, in order (for tests and checks)."""
    return [int(i) for table in tables for i in table.column("row_index").to_pylist()]

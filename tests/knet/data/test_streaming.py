"""Streamed train samples (knet.data.streaming): what a Ray Data task prepares from a shard row is the
map-style dataset's item for the same seed, epoch and index; the epoch order reads every shard once,
and a corrupted shard is one error naming it."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest
import torch

from knet.data import KNetDataset, SyntheticDataset, TransformConfig, pack_dataset
from knet.data.config import DataSource
from knet.data.errors import DataError
from knet.data.parquet import ParquetReader, load_manifest
from knet.data.shard_store import ShardStore
from knet.data.streaming import (
    contiguous_share,
    decode_sample,
    encode_sample,
    prepare_train_row,
    row_indices,
    shard_epoch_order,
    shard_row_groups,
)

TRANSFORMS = TransformConfig(train_short_range=(40, 72), max_size=96, flip_prob=0.5, crop_size=(48, 48))


@pytest.fixture(scope="module")
def shards(synthetic: SyntheticDataset, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The 8 train images in 3 shards (3, 3, 2 rows) of one-row row groups."""
    out = str(tmp_path_factory.mktemp("shards"))
    pack_dataset(synthetic.source("coco_panoptic", "train"), out, shard_size=3, row_group_mb=0.001)
    return out


def test_a_streamed_sample_is_the_map_style_item_of_the_same_seed_epoch_and_index(shards: str) -> None:
    reader = ParquetReader(DataSource(format="parquet", shards=shards))
    dataset = KNetDataset(reader, TRANSFORMS, train=True, seed=7)
    for epoch in (0, 3):
        dataset.set_epoch(epoch)
        for index in range(len(reader)):
            name, row = reader.row(index)
            prepared = prepare_train_row(
                row,
                index=index,
                epoch=epoch,
                seed=7,
                categories=reader.categories,
                transforms=TRANSFORMS,
                name=name,
            )
            image, target, meta = decode_sample(encode_sample(prepared), TRANSFORMS)
            want_image, want_target, want_meta = dataset[index]
            assert torch.equal(image, want_image)
            assert target.keys() == want_target.keys() and meta == want_meta
            for key, value in want_target.items():
                assert torch.equal(target[key], value) if torch.is_tensor(value) else target[key] == value


def test_epochs_augment_differently(shards: str) -> None:
    reader = ParquetReader(DataSource(format="parquet", shards=shards))
    name, row = reader.row(0)
    images = [
        prepare_train_row(
            row, index=0, epoch=e, seed=0, categories=reader.categories, transforms=TRANSFORMS, name=name
        )[0]
        for e in range(4)
    ]
    assert len({(tuple(i.shape), i.float().sum().item()) for i in images}) > 1


def test_an_encoded_sample_is_a_small_fraction_of_the_float_item(shards: str) -> None:
    reader = ParquetReader(DataSource(format="parquet", shards=shards))
    name, row = reader.row(0)
    sample = prepare_train_row(
        row, index=0, epoch=0, seed=0, categories=reader.categories, transforms=TRANSFORMS, name=name
    )
    image, target, _ = sample
    float_bytes = image.numel() * 4 + target["masks"].numel()  # what a map-style item holds (float, bool)
    assert len(encode_sample(sample)) < 0.5 * float_bytes
    with pytest.raises(TypeError, match="uint8"):
        encode_sample((image.float(), target, {}))


def test_an_epoch_order_holds_each_shard_of_each_repetition_once_and_changes_per_epoch() -> None:
    orders = [shard_epoch_order(5, 2, seed=1, epoch=e) for e in range(3)]
    for order in orders:
        assert sorted(order) == [(r, k) for r in range(2) for k in range(5)]
    assert orders[0] != orders[1] != orders[2]
    assert shard_epoch_order(5, 2, seed=1, epoch=1) == orders[1]
    assert shard_epoch_order(5, 2, seed=2, epoch=1) != orders[1]


@pytest.mark.parametrize("protocol", ["file", "memory"])
def test_a_shard_yields_every_row_once_numbered_by_repetition(shards: str, protocol: str) -> None:
    uri = shards if protocol == "file" else _copy_to_memory(shards)
    manifest = load_manifest(uri)
    store = ShardStore(uri, manifest.shards)
    seen = []
    for repetition in range(2):
        for k in range(len(manifest.shards)):
            tables = list(shard_row_groups(store, k, repetition=repetition, seed=0, epoch=2))
            assert all(t.column("epoch").to_pylist() == [2] * len(t) for t in tables)
            seen += row_indices(tables)
    assert sorted(seen) == list(range(2 * len(store)))


def test_a_corrupted_shard_is_one_error_naming_it(shards: str) -> None:
    uri = _copy_to_memory(shards)
    manifest = load_manifest(uri)
    fs = fsspec.filesystem("memory")
    path = f"{uri.removeprefix('memory://')}/{manifest.shards[1].path}"
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    store = ShardStore(uri, manifest.shards)
    assert row_indices(list(shard_row_groups(store, 0, repetition=0, seed=0, epoch=0))) != []
    with pytest.raises(DataError, match=f"checksum mismatch for Parquet shard {uri}/shard-00001.parquet"):
        list(shard_row_groups(store, 1, repetition=0, seed=0, epoch=0))


@pytest.mark.parametrize("num_items", [0, 1, 5, 32, 33])
@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_contiguous_shares_cover_every_item_exactly_once(num_items: int, world_size: int) -> None:
    shares = [list(contiguous_share(num_items, rank, world_size)) for rank in range(world_size)]
    assert [i for share in shares for i in share] == list(range(num_items))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def _copy_to_memory(folder: str) -> str:
    uri = f"memory://streaming-{np.random.default_rng().integers(1 << 30)}"
    fs = fsspec.filesystem("memory")
    local = fsspec.filesystem("file")
    for path in local.ls(folder, detail=False):
        fs.pipe_file(f"{uri.removeprefix('memory://')}/{path.rsplit('/', 1)[1]}", local.cat_file(path))
    return uri

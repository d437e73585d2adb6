"""Shards read in part: byte-sized row groups, row-group random access, a seeded streaming order."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from knet.data import DataError, DataSource, SyntheticDataset, check_dataset, pack_dataset, synthesize
from knet.data.parquet import Manifest, ParquetReader, load_manifest, write_shards
from knet.data.shard_store import epoch_units, iter_rows, shard_layout

ROW_GROUP_MB = 0.01  # ~10 KB: a few of the 48x48 synthetic rows


@pytest.fixture(scope="module")
def forty(tmp_path_factory: pytest.TempPathFactory) -> SyntheticDataset:
    """32 train images of 48x48, enough rows for several shards of several row groups."""
    return synthesize(
        tmp_path_factory.mktemp("forty"), num_images=40, seed=5, image_size=(48, 48), val_fraction=0.2
    )


def _pack(data: SyntheticDataset, out: str, **sizes: float) -> ParquetReader:
    pack_dataset(data.source("coco_panoptic", "train"), out, **sizes)
    return ParquetReader(DataSource("parquet", shards=out))


def _payload(row: dict) -> int:
    return len(row["image"]) + sum(len(c) for c in row["masks_rle"]) + 64


def test_pack_closes_row_groups_and_shards_by_bytes(forty: SyntheticDataset, tmp_path: Path) -> None:
    reader = _pack(forty, str(tmp_path), target_mb=ROW_GROUP_MB * 3, row_group_mb=ROW_GROUP_MB)
    shards = reader.manifest.shards
    assert len(shards) >= 3 and all(len(s.row_groups) >= 2 for s in shards[:-1])
    limit = int(ROW_GROUP_MB * 2**20)
    for k, shard in enumerate(shards):
        footer = pq.ParquetFile(tmp_path / shard.path).metadata
        assert [footer.row_group(g).num_rows for g in range(footer.num_row_groups)] == shard.row_groups
        assert shard.num_bytes == (tmp_path / shard.path).stat().st_size
        for g in range(len(shard.row_groups)):
            sizes = [_payload(row) for row in reader.store.read_row_group(k, g).to_pylist()]
            assert sum(sizes[:-1]) < limit  # the group closed at the first row reaching the limit ...
            if g < len(shard.row_groups) - 1:
                assert sum(sizes) >= limit  # ... and not before
    assert load_manifest(str(tmp_path)).shards == shards


def test_a_row_cap_still_closes_shards(forty: SyntheticDataset, tmp_path: Path) -> None:
    reader = _pack(forty, str(tmp_path), shard_size=12, row_group_mb=ROW_GROUP_MB)
    assert [s.num_rows for s in reader.manifest.shards] == [12, 12, 8]


def test_random_access_returns_the_rows_of_the_sequential_stream(forty: SyntheticDataset, tmp_path: Path):
    reader = _pack(forty, str(tmp_path), target_mb=ROW_GROUP_MB * 3, row_group_mb=ROW_GROUP_MB)
    sequential = list(iter_rows(reader.store))
    assert [index for index, _ in sequential] == list(range(len(reader)))
    order = list(range(len(reader)))
    random.Random(0).shuffle(order)
    for index in order:
        assert reader.row(index)[1] == sequential[index][1]


def test_the_reader_keeps_row_offsets_not_a_row_index(forty: SyntheticDataset, tmp_path: Path) -> None:
    reader = _pack(forty, str(tmp_path), row_group_mb=1.0)  # one shard, one row group of 32 rows
    for index in range(len(reader)):
        reader.read(index)
    held = [
        v
        for v in [*vars(reader).values(), *vars(reader.store).values()]
        if isinstance(v, (list, np.ndarray, dict))
    ]
    assert max(len(v) for v in held) <= 2  # per shard and per row-group offsets, nothing per row


def test_a_corrupted_shard_is_one_error_naming_it(forty: SyntheticDataset, tmp_path: Path) -> None:
    reader = _pack(forty, str(tmp_path), target_mb=ROW_GROUP_MB * 3, row_group_mb=ROW_GROUP_MB)
    shard = tmp_path / reader.manifest.shards[1].path
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    fresh = ParquetReader(DataSource("parquet", shards=str(tmp_path)))
    fresh.read(0)  # shard 0 is intact
    message = r"checksum mismatch for Parquet shard .*shard-00001\.parquet"
    with pytest.raises(DataError, match=message):
        fresh.read(fresh.store.shard_start(1))
    with pytest.raises(DataError, match=message):
        list(iter_rows(fresh.store, seed=0))
    with pytest.raises(DataError, match=message):
        list(fresh.store.read_shard(1))
    report = check_dataset(str(tmp_path))
    assert len(report.problems) == 1 and "shard-00001.parquet" in report.problems[0]
    assert report.num_images == len(fresh) - fresh.manifest.shards[1].num_rows


def test_a_memory_uri_streams_like_a_local_folder(forty: SyntheticDataset, tmp_path: Path) -> None:
    sizes = {"target_mb": ROW_GROUP_MB * 3, "row_group_mb": ROW_GROUP_MB}
    local = _pack(forty, str(tmp_path), **sizes)
    memory = _pack(forty, "memory://knet-row-groups/train", **sizes)
    assert [s.sha256 for s in memory.manifest.shards] == [s.sha256 for s in local.manifest.shards]
    assert list(iter_rows(memory.store, seed=3)) == list(iter_rows(local.store, seed=3))
    assert memory.row(7) == (
        local.row(7)[0].replace(str(tmp_path), "memory://knet-row-groups/train"),
        local.row(7)[1],
    )
    assert shard_layout(memory.store) == shard_layout(local.store)


def test_the_seeded_stream_yields_each_row_once_per_epoch_in_a_new_order(forty: SyntheticDataset, tmp_path):
    reader = _pack(forty, str(tmp_path), target_mb=ROW_GROUP_MB * 3, row_group_mb=ROW_GROUP_MB)
    store = reader.store

    def order(seed: int, epoch: int) -> list[int]:
        return [index for index, _ in iter_rows(store, seed=seed, epoch=epoch, buffer_rows=8)]

    first, second = order(seed=1, epoch=0), order(seed=1, epoch=1)
    assert sorted(first) == sorted(second) == list(range(len(reader)))
    assert first != second
    assert order(seed=1, epoch=0) == first
    assert order(seed=2, epoch=0) != first
    assert epoch_units(store.units(), 1, 0) == epoch_units(store.units(), 1, 0)


def test_ranks_splitting_the_block_order_cover_every_row_once(forty: SyntheticDataset, tmp_path: Path):
    reader = _pack(forty, str(tmp_path), target_mb=ROW_GROUP_MB * 3, row_group_mb=ROW_GROUP_MB)
    units = epoch_units(reader.store.units(), seed=4, epoch=2)
    seen = [index for rank in range(2) for index, _ in iter_rows(reader.store, units[rank::2])]
    assert sorted(seen) == list(range(len(reader)))


def test_a_manifest_without_row_groups_still_reads(forty: SyntheticDataset, tmp_path: Path) -> None:
    reader = _pack(forty, str(tmp_path), target_mb=ROW_GROUP_MB * 3, row_group_mb=ROW_GROUP_MB)
    expected = list(iter_rows(reader.store))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for shard in manifest["shards"]:
        del shard["num_bytes"], shard["row_groups"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    old = ParquetReader(DataSource("parquet", shards=str(tmp_path)))
    assert list(iter_rows(old.store)) == expected
    assert old.row(len(old) - 1)[1] == expected[-1][1]


def test_row_groups_not_adding_up_to_the_rows_are_named(forty: SyntheticDataset, tmp_path: Path) -> None:
    _pack(forty, str(tmp_path))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["shards"][0]["row_groups"] = [1]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"shards\[0\]\.row_groups must be .* num_rows=32"):
        load_manifest(str(tmp_path))


def test_check_reports_shard_and_row_group_sizes(synthetic: SyntheticDataset, tmp_path: Path) -> None:
    pack_dataset(synthetic.source("coco_panoptic", "train"), str(tmp_path), shard_size=4, row_group_mb=1e-6)
    report = check_dataset(str(tmp_path))
    assert report.ok
    assert report.storage[0].startswith("shards: 2, 8 rows, ")
    assert report.storage[1].startswith("row groups: 8, 4.0 per shard ")  # one row each at this size
    assert report.storage[0] in report.summary()


def test_write_shards_re_lays_out_packed_rows_without_decoding(
    forty: SyntheticDataset, tmp_path: Path
) -> None:
    old = _pack(forty, str(tmp_path / "old"))  # one shard, one row group
    manifest = Manifest(str(tmp_path / "new"), old.manifest.categories)
    write_shards((row for _, row in iter_rows(old.store)), manifest, row_group_mb=ROW_GROUP_MB)
    new = ParquetReader(DataSource("parquet", shards=str(tmp_path / "new")))
    assert len(new.manifest.shards[0].row_groups) > 1
    assert list(iter_rows(new.store)) == list(iter_rows(old.store))

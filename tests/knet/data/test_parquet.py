"""Parquet shards read back identical to their source; corruption is caught by checksum."""

from __future__ import annotations

import pytest
import torch

from knet.data import DataError, DataSource, SyntheticDataset, pack_dataset
from knet.data.readers import open_reader


def _assert_same(a, b) -> None:
    assert a.categories == b.categories
    assert len(a) == len(b)
    for i in range(len(a)):
        (ia, ta, ma), (ib, tb, mb) = a.read(i), b.read(i)
        assert torch.equal(ia, ib)
        for key in ("labels", "masks", "iscrowd"):
            assert torch.equal(ta[key], tb[key]), key
        assert ta["image_id"] == tb["image_id"] and ma == mb


@pytest.mark.parametrize("fmt", ["coco_panoptic", "coco_instance", "semantic"])
def test_packed_shards_read_back_identical(synthetic: SyntheticDataset, tmp_path, fmt: str) -> None:
    src = synthetic.source(fmt, "train")
    manifest = pack_dataset(src, str(tmp_path / "pq"), shard_size=3)
    assert [s.num_rows for s in manifest.shards] == [3, 3, 2]
    _assert_same(open_reader(src), open_reader(DataSource("parquet", shards=str(tmp_path / "pq"))))


def test_packing_to_an_fsspec_memory_uri_round_trips(synthetic: SyntheticDataset) -> None:
    src = synthetic.source("coco_panoptic", "val")
    pack_dataset(src, "memory://knet-test/val", shard_size=10)
    _assert_same(open_reader(src), open_reader(DataSource("parquet", shards="memory://knet-test/val")))


def test_a_corrupted_shard_raises_a_checksum_error_naming_it(synthetic: SyntheticDataset, tmp_path) -> None:
    pack_dataset(synthetic.source("coco_panoptic", "train"), str(tmp_path), shard_size=4)
    shard = tmp_path / "shard-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    reader = open_reader(DataSource("parquet", shards=str(tmp_path)))
    reader.read(0)  # shard 0 is intact
    with pytest.raises(DataError, match=r"checksum mismatch.*shard-00001\.parquet"):
        reader.read(5)


def test_a_missing_shard_or_manifest_is_named(synthetic: SyntheticDataset, tmp_path) -> None:
    with pytest.raises(DataError, match="manifest not found.*manifest.json"):
        open_reader(DataSource("parquet", shards=str(tmp_path)))
    pack_dataset(synthetic.source("coco_instance", "val"), str(tmp_path))
    (tmp_path / "shard-00000.parquet").unlink()
    with pytest.raises(DataError, match="shard not found.*shard-00000.parquet"):
        open_reader(DataSource("parquet", shards=str(tmp_path)))


def test_the_manifest_records_reduce_zero_label_of_a_semantic_source(synthetic: SyntheticDataset, tmp_path):
    from knet.data.parquet import load_manifest

    ade = synthetic.source("semantic", "val")  # label PNG value = category index + 1, as ADE20K
    assert ade.reduce_zero_label
    assert pack_dataset(ade, str(tmp_path / "ade")).reduce_zero_label is True
    assert load_manifest(str(tmp_path / "ade")).reduce_zero_label is True
    panoptic = synthetic.source("coco_panoptic", "val")
    pack_dataset(panoptic, str(tmp_path / "panoptic"))
    assert load_manifest(str(tmp_path / "panoptic")).reduce_zero_label is False

"""detect_source finds the format from a path; check_dataset counts what is there."""

from __future__ import annotations

import pytest

from knet.data import DataError, SyntheticDataset, check_dataset, detect_source, pack_dataset
from knet.data.readers import open_reader


@pytest.mark.parametrize("fmt", ["coco_instance", "coco_panoptic"])
def test_detect_source_from_a_coco_json_finds_images_and_pngs(synthetic: SyntheticDataset, fmt: str) -> None:
    expected = synthetic.source(fmt, "val")
    assert detect_source(expected.annotations) == expected


@pytest.mark.parametrize("split", ["train", "val"])
def test_detect_source_finds_a_label_folder_beside_its_images_split(
    synthetic: SyntheticDataset, split: str
) -> None:
    expected = synthetic.source("semantic", split)  # semantic/<split> beside images/<split>
    assert detect_source(expected.masks) == expected  # reduce_zero_label from categories.json
    assert check_dataset(expected.masks).ok


def test_detect_source_recognises_a_parquet_folder(synthetic: SyntheticDataset, tmp_path) -> None:
    pack_dataset(synthetic.source("coco_panoptic", "val"), str(tmp_path))
    assert detect_source(str(tmp_path)).format == "parquet"


def test_detect_source_refuses_an_ambiguous_folder(synthetic: SyntheticDataset) -> None:
    with pytest.raises(DataError, match="several annotation JSONs"):
        detect_source(str(synthetic.out_dir / "coco_panoptic"))


def test_check_dataset_counts_images_segments_and_crowds(synthetic: SyntheticDataset) -> None:
    src = synthetic.source("coco_panoptic", "train")
    report = check_dataset(src)
    reader = open_reader(src)
    targets = [reader.read(i)[1] for i in range(len(reader))]
    assert report.ok and "OK" in report.summary()
    assert report.num_images == 8
    assert (report.num_thing_classes, report.num_stuff_classes) == (3, 2)
    assert report.crowd_segments == sum(int(t["iscrowd"].sum()) for t in targets)
    for k, name in enumerate(reader.categories.names):
        assert report.segments_per_class[name] == sum(int((t["labels"] == k).sum()) for t in targets)

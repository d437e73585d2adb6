"""DataSource / TransformConfig validate themselves and map to and from plain dicts strictly."""

from __future__ import annotations

import pytest

from knet.data import DataSource, TransformConfig


def test_data_source_round_trips_through_a_dict() -> None:
    src = DataSource("coco_panoptic", images="i", annotations="a.json", masks="m", skip_invalid=True)
    assert DataSource.from_dict(src.to_dict()) == src


def test_data_source_names_a_missing_path_field() -> None:
    with pytest.raises(ValueError, match="needs the field 'masks'"):
        DataSource("coco_panoptic", images="i", annotations="a.json")
    with pytest.raises(ValueError, match="format='voc'"):
        DataSource("voc", images="i")


def test_unknown_keys_are_rejected_with_a_suggestion() -> None:
    with pytest.raises(ValueError, match="did you mean 'annotations'"):
        DataSource.from_dict({"format": "coco_instance", "images": "i", "anotations": "a.json"})
    with pytest.raises(ValueError, match="did you mean 'crop_size'"):
        TransformConfig.from_dict({"crop_sise": [64, 64]})


def test_transform_config_round_trips_and_validates() -> None:
    cfg = TransformConfig(train_short_range=(32, 64), crop_size=(48, 48), max_size=128)
    assert TransformConfig.from_dict(cfg.to_dict()) == cfg
    assert TransformConfig().train_short_sides == [800]
    with pytest.raises(ValueError, match="not both"):
        TransformConfig(train_short_sides=[32], train_short_range=(32, 64))
    with pytest.raises(ValueError, match="flip_prob"):
        TransformConfig(flip_prob=1.5)
    with pytest.raises(ValueError, match="std"):
        TransformConfig(std=(1.0, 0.0, 1.0))

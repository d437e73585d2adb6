"""knet.bundle: a saved bundle rebuilds the same model and predicts at each image's original size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from knet import KNetConfig, build_model
from knet.bundle import load_bundle, save_bundle
from knet.data import Category, CategoryTable, TransformConfig

CATEGORIES = CategoryTable(
    [Category(1, "square", True), Category(7, "disc", True), Category(20, "sky", False)]
)
TRANSFORMS = TransformConfig(train_short_sides=[64], max_size=64, test_short_side=64, test_max_size=64)


def tiny_model() -> tuple[torch.nn.Module, KNetConfig]:
    config = KNetConfig.for_task(
        "panoptic",
        num_thing_classes=2,
        num_stuff_classes=1,
        backbone="resnet18",
        channels=32,
        num_proposals=4,
        num_stages=1,
        update={"feedforward_channels": 64, "num_heads": 4},
    )
    torch.manual_seed(0)
    return build_model(config).eval(), config


def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.integers(0, 256, (48, 80, 3), dtype=np.uint8),
        rng.integers(0, 256, (70, 50, 3), dtype=np.uint8),
    ]


def test_round_trip_predicts_identically_at_original_sizes(tmp_path):
    model, config = tiny_model()
    save_bundle(tmp_path, model, config, CATEGORIES, TRANSFORMS)
    first = load_bundle(tmp_path)
    second = load_bundle(tmp_path)
    assert first.config == config and first.categories == CATEGORIES and first.transforms == TRANSFORMS
    for name, value in model.state_dict().items():
        assert torch.equal(first.model.state_dict()[name], value), name
    a, b = first.predict(images()), second.predict(images())
    assert [p.image_size for p in a] == [(48, 80), (70, 50)]
    for pa, pb in zip(a, b):
        assert pa.panoptic.segment_map.shape == pa.image_size
        assert torch.equal(pa.panoptic.segment_map, pb.panoptic.segment_map)
        assert torch.equal(pa.instance.scores, pb.instance.scores)
        assert pa.instance.masks.shape[-2:] == pa.image_size


def test_bundle_files_are_plain_json_and_a_state_dict(tmp_path):
    model, config = tiny_model()
    save_bundle(tmp_path, model, config, CATEGORIES, TRANSFORMS)
    assert json.loads((tmp_path / "model_config.json").read_text()) == config.to_dict()
    inference = json.loads((tmp_path / "inference.json").read_text())
    assert [c["id"] for c in inference["categories"]] == [1, 7, 20]
    state = torch.load(tmp_path / "weights.pt", weights_only=True)
    assert set(state) == set(model.state_dict())


def test_saving_with_mismatched_categories_is_refused(tmp_path):
    model, config = tiny_model()
    wrong = CategoryTable([Category(1, "square", True), Category(20, "sky", False)])
    with pytest.raises(ValueError, match="category table has 1 / 1"):
        save_bundle(tmp_path, model, config, wrong, TRANSFORMS)


def test_loading_a_folder_without_weights_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights.pt is missing"):
        load_bundle(tmp_path)


def test_predict_rejects_non_uint8_images(tmp_path):
    model, config = tiny_model()
    bundle = load_bundle(save_bundle(tmp_path, model, config, CATEGORIES, TRANSFORMS))
    with pytest.raises(ValueError, match="uint8 RGB"):
        bundle.predict([np.zeros((32, 32, 3), dtype=np.float32)])


def test_reduce_zero_label_is_recorded_and_older_bundles_load_without_it(tmp_path):
    model, config = tiny_model()
    assert (
        load_bundle(save_bundle(tmp_path / "plain", model, config, CATEGORIES, TRANSFORMS)).reduce_zero_label
        is False
    )
    ade = save_bundle(tmp_path / "ade", model, config, CATEGORIES, TRANSFORMS, reduce_zero_label=True)
    assert json.loads((ade / "inference.json").read_text())["reduce_zero_label"] is True
    assert load_bundle(ade).reduce_zero_label is True
    inference = json.loads((ade / "inference.json").read_text())
    del inference["reduce_zero_label"]  # a bundle written before the field existed
    (ade / "inference.json").write_text(json.dumps(inference))
    assert load_bundle(ade).reduce_zero_label is False

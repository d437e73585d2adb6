"""Prediction from a bundle writes the official result formats and overlays; eval gives val metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from knet_platform.cli import main
from knet_platform.experiment import load_experiment
from knet_platform.predict import evaluate_bundle, load_model, predict_paths
from PIL import Image

from knet import KNetConfig, build_model
from knet.bundle import save_bundle
from knet.data import Category, CategoryTable, TransformConfig

REPO = Path(__file__).absolute().parents[2]
CATEGORIES = CategoryTable([Category(3, "square", True), Category(9, "sky", False)])
TRANSFORMS = TransformConfig(train_short_sides=[64], max_size=64, test_short_side=64, test_max_size=64)


def tiny_bundle(directory: Path, task: str = "panoptic", categories: CategoryTable = CATEGORIES) -> Path:
    config = KNetConfig.for_task(
        task,
        num_thing_classes=categories.num_thing_classes,
        num_stuff_classes=categories.num_stuff_classes,
        backbone="resnet18",
        channels=32,
        num_proposals=4,
        num_stages=1,
        update={"feedforward_channels": 64, "num_heads": 4},
        inference={"instance_score_thr": 0.0},
    )
    torch.manual_seed(0)
    return save_bundle(directory, build_model(config).eval(), config, categories, TRANSFORMS)


def write_images(folder: Path) -> list[Path]:
    folder.mkdir()
    rng = np.random.default_rng(0)
    paths = []
    for name, shape in (("a.png", (40, 72, 3)), ("b.jpg", (64, 48, 3))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / name)
        paths.append(folder / name)
    return paths


def test_panoptic_predict_writes_pngs_json_and_overlays(tmp_path):
    bundle = load_model(tiny_bundle(tmp_path / "bundle"))
    images = write_images(tmp_path / "images")
    written = predict_paths(bundle, [tmp_path / "images"], tmp_path / "out")
    out = tmp_path / "out"
    assert set(written) == {out / "panoptic" / "a.png", out / "panoptic" / "b.png", out / "panoptic.json",
                            out / "overlays" / "a.png", out / "overlays" / "b.png"}  # fmt: skip
    results = json.loads((out / "panoptic.json").read_text())["annotations"]
    assert [r["file_name"] for r in results] == ["a.png", "b.png"]
    for result in results:
        assert {s["category_id"] for s in result["segments_info"]} <= {3, 9}  # dataset ids, not contiguous
    for image in images:
        size = Image.open(image).size
        assert Image.open(out / "panoptic" / f"{image.stem}.png").size == size
        assert Image.open(out / "overlays" / f"{image.stem}.png").size == size


def test_instance_and_semantic_parts_write_their_formats(tmp_path):
    bundle = load_model(tiny_bundle(tmp_path / "bundle"))
    write_images(tmp_path / "images")
    predict_paths(bundle, [tmp_path / "images"], tmp_path / "inst", task_part="instance")
    entries = json.loads((tmp_path / "inst" / "instances.json").read_text())
    assert entries and {e["category_id"] for e in entries} == {3}
    assert {e["image_id"] for e in entries} <= {1, 2} and all("counts" in e["segmentation"] for e in entries)
    predict_paths(bundle, [tmp_path / "images" / "a.png"], tmp_path / "sem", task_part="semantic")
    labels = np.asarray(Image.open(tmp_path / "sem" / "semantic" / "a.png"))
    assert labels.shape == (40, 72) and set(np.unique(labels)) <= {3, 9}


def test_cli_predict_on_a_missing_input_exits_2(tmp_path, capsys):
    tiny_bundle(tmp_path / "bundle")
    code = main(
        ["predict", "--model", str(tmp_path / "bundle"), str(tmp_path / "nope.png"), "--out", str(tmp_path)]
    )
    assert code == 2 and "nope.png does not exist" in capsys.readouterr().err


def test_evaluate_bundle_reports_val_metrics_of_the_synthetic_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    experiment = load_experiment(
        REPO / "experiments" / "quickstart.yaml",
        ["data.synthetic.num_images=4", "data.synthetic.image_size=[64, 64]", "data.synthetic.cache_dir=syn"],
    )
    from knet.data import build_dataset, synthesize

    synthesize(tmp_path / "syn", num_images=4, seed=0, image_size=(64, 64))
    categories = build_dataset(experiment.data.val, TRANSFORMS, train=False).categories
    bundle = load_model(tiny_bundle(tmp_path / "bundle", categories=categories))
    metrics = evaluate_bundle(bundle, experiment)
    assert {"val/pq", "val/mask_ap", "val/miou"} <= set(metrics)
    assert all(0.0 <= metrics[k] <= 100.0 for k in ("val/pq", "val/miou"))


def test_numeric_file_stems_become_coco_image_ids(tmp_path):
    bundle = load_model(tiny_bundle(tmp_path / "bundle"))
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / "000000000139.png")
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / "x.png")
    predict_paths(bundle, [tmp_path / "images"], tmp_path / "out")
    results = json.loads((tmp_path / "out" / "panoptic.json").read_text())["annotations"]
    assert [r["image_id"] for r in results] == [139, 2]

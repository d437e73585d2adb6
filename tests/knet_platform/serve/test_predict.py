"""Prediction from a bundle writes the official result formats and overlays; eval gives val metrics."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from knet_platform.cli import main
from knet_platform.experiment.schema import Experiment, load_experiment
from knet_platform.knet_adapter import reduces_zero_label, write_bundle
from knet_platform.serve.evaluate import evaluate_bundle
from knet_platform.serve.predict import load_model, predict_paths
from knet_platform.train.datasets import build_datasets
from PIL import Image

from knet import KNetConfig, build_model
from knet.bundle import save_bundle
from knet.data import Category, CategoryTable, TransformConfig, pack_dataset, synthesize

REPO = Path(__file__).absolute().parents[3]
CATEGORIES = CategoryTable([Category(3, "square", True), Category(9, "sky", False)])
TRANSFORMS = TransformConfig(train_short_sides=[64], max_size=64, test_short_side=64, test_max_size=64)


def tiny_bundle(
    directory: Path,
    task: str = "panoptic",
    categories: CategoryTable = CATEGORIES,
    reduce_zero_label: bool = False,
    transforms: TransformConfig = TRANSFORMS,
) -> Path:
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
    model = build_model(config).eval()
    return save_bundle(directory, model, config, categories, transforms, reduce_zero_label=reduce_zero_label)


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
        width, height = Image.open(out / "overlays" / f"{image.stem}.png").size
        assert width > size[0] and height >= size[1]  # the image, with its legend strip to the right


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


def test_semantic_pngs_of_a_reduce_zero_label_bundle_hold_the_dataset_label_values(tmp_path):
    # ADE20K-style data: file value v is class v - 1 (0 = unlabelled), so the written PNG must hold
    # dataset id + 1, what the training labels held, for the same prediction.
    bundle = load_model(tiny_bundle(tmp_path / "bundle", reduce_zero_label=True))
    assert bundle.reduce_zero_label
    images = write_images(tmp_path / "images")
    predict_paths(bundle, [images[0]], tmp_path / "sem", task_part="semantic")
    written = np.asarray(Image.open(tmp_path / "sem" / "semantic" / "a.png")).astype(np.int64)
    (prediction,) = bundle.predict([np.asarray(Image.open(images[0]).convert("RGB"))])
    contiguous = prediction.semantic.label_map.numpy()
    expected = (
        np.array([CATEGORIES.to_dataset_id(int(k)) for k in contiguous.ravel()]).reshape(contiguous.shape) + 1
    )
    assert np.array_equal(written, expected) and set(np.unique(written)) <= {4, 10}


def test_the_val_set_is_built_with_the_train_category_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    synthesize(tmp_path / "syn", num_images=8, seed=0, image_size=(64, 64))
    val_labels = tmp_path / "val_labels"  # the val labels without class 0 (file value 1)
    val_labels.mkdir()
    for png in (tmp_path / "syn" / "semantic" / "val").glob("*.png"):
        labels = np.asarray(Image.open(png)).copy()
        labels[labels == 1] = 2
        Image.fromarray(labels).save(val_labels / png.name)
    experiment = load_experiment(
        REPO / "experiments" / "quickstart_semantic.yaml",
        [
            "data.synthetic.num_images=8",
            "data.synthetic.image_size=[64, 64]",
            "data.synthetic.cache_dir=syn",
            "data.train.annotations=null",  # no categories JSON: tables come from the label values
            "data.val.annotations=null",
            f"data.val.masks={val_labels}",
        ],
    )
    datasets = build_datasets(experiment)
    assert [c.id for c in datasets.categories.categories] == [0, 1, 2, 3, 4]
    assert datasets.val.categories == datasets.categories


def test_a_bundle_trained_from_packed_ade20k_style_shards_writes_the_source_label_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    synthesize(tmp_path / "syn", num_images=4, seed=0, image_size=(64, 64))
    experiment = load_experiment(
        REPO / "experiments" / "quickstart_semantic.yaml",
        ["data.synthetic.num_images=4", "data.synthetic.image_size=[64, 64]", "data.synthetic.cache_dir=syn"],
    )
    pack_dataset(experiment.data.train, str(tmp_path / "shards"))  # a reduce_zero_label source
    packed = experiment.with_overrides(
        {"data.train": {"format": "parquet", "shards": str(tmp_path / "shards")}}
    )
    datasets = build_datasets(packed)
    config = packed.model_config(datasets.categories)
    reduce = reduces_zero_label(packed.data.train)  # read from the shards' manifest
    write_bundle(
        tmp_path / "bundle", build_model(config), config, datasets.categories, packed.data.transforms,
        reduce_zero_label=reduce,
    )  # fmt: skip
    assert load_model(tmp_path / "bundle").reduce_zero_label is True


def test_cli_predict_on_a_missing_input_exits_2(tmp_path, capsys):
    tiny_bundle(tmp_path / "bundle")
    code = main(
        ["predict", "--model", str(tmp_path / "bundle"), str(tmp_path / "nope.png"), "--out", str(tmp_path)]
    )
    assert code == 2 and "nope.png does not exist" in capsys.readouterr().err


def synthetic_quickstart(tmp_path: Path, num_images: int, size: int) -> tuple[Experiment, CategoryTable]:
    """The quickstart experiment on a synthetic set written to ``tmp_path/syn``, and its categories."""
    from knet.data import build_dataset

    overrides = [
        f"data.synthetic.{key}" for key in (f"num_images={num_images}", f"image_size=[{size}, {size}]")
    ]
    experiment = load_experiment(
        REPO / "experiments" / "quickstart.yaml", [*overrides, f"data.synthetic.cache_dir={tmp_path / 'syn'}"]
    )
    synthesize(tmp_path / "syn", num_images=num_images, seed=0, image_size=(size, size))
    return experiment, build_dataset(experiment.data.val, TRANSFORMS, train=False).categories


def test_numeric_file_stems_become_coco_image_ids(tmp_path):
    bundle = load_model(tiny_bundle(tmp_path / "bundle"))
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / "000000000139.png")
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "images" / "x.png")
    predict_paths(bundle, [tmp_path / "images"], tmp_path / "out")
    results = json.loads((tmp_path / "out" / "panoptic.json").read_text())["annotations"]
    assert [r["image_id"] for r in results] == [139, 2]


def test_evaluate_bundle_scores_at_the_original_size_like_evaluate_results_on_written_files(
    tmp_path,
):
    from knet.evaluation import evaluate_results, write_semantic_png

    experiment, categories = synthetic_quickstart(tmp_path, num_images=8, size=96)
    half = dataclasses.replace(TRANSFORMS, test_short_side=48, test_max_size=48)  # the model sees 48x48
    bundle = load_model(tiny_bundle(tmp_path / "bundle", categories=categories, transforms=half))
    metrics = evaluate_bundle(bundle, experiment)
    predict_paths(bundle, [Path(experiment.data.val.images)], tmp_path / "out")
    panoptic = evaluate_results(
        "panoptic", Path(experiment.data.val.annotations), tmp_path / "out" / "panoptic.json"
    )
    # Label PNGs of contiguous class + 1, the synthetic semantic split's encoding.
    for path in sorted(Path(experiment.data.val.images).glob("*.png")):
        (prediction,) = bundle.predict([np.asarray(Image.open(path).convert("RGB"))])
        write_semantic_png(prediction, tmp_path / "semantic" / path.name, reduce_zero_label=True)
    semantic = evaluate_results(
        "semantic",
        tmp_path / "syn" / "semantic" / "val",
        tmp_path / "semantic",
        num_classes=5,
        reduce_zero_label=True,
    )
    assert metrics["val/miou"] > 0.0  # aacc at the test size (targets resized) would be 7.34, not 7.22
    for key, offline in (
        ("pq", panoptic),
        ("sq", panoptic),
        ("rq", panoptic),
        ("miou", semantic),
        ("aacc", semantic),
    ):
        assert metrics[f"val/{key}"] == pytest.approx(offline[key])


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.parametrize(
    ("content", "cause"),
    [
        (b"", "is empty (0 bytes)"),
        (b"just some text, not an image\n", "is not an image that can be decoded"),
        ("truncated", "is not an image that can be decoded"),
    ],
)
def test_cli_predict_refuses_an_undecodable_input_before_writing_anything(tmp_path, capsys, content, cause):
    tiny_bundle(tmp_path / "bundle")
    images = write_images(tmp_path / "images")  # a.png, b.jpg: good, and predicted first
    bad = tmp_path / "images" / "z.png"
    bad.write_bytes(images[0].read_bytes()[:60] if content == "truncated" else content)
    out = tmp_path / "out"
    code = main(["predict", "--model", str(tmp_path / "bundle"), str(tmp_path / "images"), "--out", str(out)])
    errors = _error_lines(capsys)
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: input {bad} ") and cause in errors[0] and "remove it" in errors[0]
    assert not out.exists()  # nothing half-written: no PNGs without their panoptic.json


def test_cli_predict_into_a_file_is_one_error(tmp_path, capsys):
    tiny_bundle(tmp_path / "bundle")
    write_images(tmp_path / "images")
    (tmp_path / "out").write_text("a file")
    code = main(
        [
            "predict",
            "--model",
            str(tmp_path / "bundle"),
            str(tmp_path / "images"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2 and _error_lines(capsys) == [f"error: --out {tmp_path / 'out'} is a file: pass a folder "
                                                  "to write the results into"]  # fmt: skip


def test_a_16_bit_grey_image_predicts_like_its_8_bit_version(tmp_path):
    """knet predict reads images with knet's own decoder: a 16-bit PNG is not all-white."""
    bundle = load_model(tiny_bundle(tmp_path / "bundle"))
    grey = np.random.default_rng(0).integers(0, 256, (40, 56), dtype=np.uint16)
    (tmp_path / "eight").mkdir()
    (tmp_path / "sixteen").mkdir()
    Image.fromarray(grey.astype(np.uint8)).save(tmp_path / "eight" / "a.png")
    Image.fromarray(grey * 257).save(tmp_path / "sixteen" / "a.png")  # uint16: a 16-bit PNG (mode I;16)
    for folder in ("eight", "sixteen"):
        predict_paths(bundle, [tmp_path / folder], tmp_path / f"out-{folder}")
    first, second = (
        np.asarray(Image.open(tmp_path / f"out-{f}" / "panoptic" / "a.png")) for f in ("eight", "sixteen")
    )
    assert np.array_equal(first, second)

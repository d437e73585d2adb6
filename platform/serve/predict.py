"""Prediction and evaluation from a model bundle (a folder, or an MLflow model URI downloaded to one).

from knet_platform.serve.predict import load_model
predictions = load_model("models:/quickstart@champion").predict([rgb_uint8_array])
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from knet.bundle import ModelBundle, load_bundle, prediction_to_cpu
from knet.evaluation import CocoInstanceResultsWriter, PanopticResultsWriter, write_semantic_png
from knet.structures import Prediction

if TYPE_CHECKING:
    from knet_platform.experiment.schema import Experiment

TaskPart = Literal["panoptic", "instance", "semantic"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def load_model(model_uri: str | Path, *, tracking_uri: str | None = None) -> ModelBundle:
    """A bundle from a local folder, or from ``models:/name@alias`` / ``runs:/...`` in the MLflow store
    (``tracking_uri``, default ``$MLFLOW_TRACKING_URI`` or the local store under ``$KNET_HOME``, as
    ``knet run`` writes it)."""
    if "://" not in str(model_uri) and not str(model_uri).startswith("models:"):
        return load_bundle(model_uri)
    from knet_platform.experiment.home import default_tracking_uri
    from knet_platform.tracking.registry import download_model  # MLflow only when a URI is given

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    with tempfile.TemporaryDirectory(prefix="knet-model-") as scratch:
        return load_bundle(download_model(str(model_uri), uri, scratch))


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Image files, with folders expanded to their images (sorted)."""
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files.extend(sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"input {item} does not exist: pass image files or folders")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, inputs))}")
    return files


def predict_paths(
    bundle: ModelBundle, inputs: list[Path], out_dir: str | Path, *, task_part: TaskPart | None = None
) -> list[Path]:
    """Predict every image and write official-format results plus overlays into ``out_dir``:

    Image ids follow ``image_id_of``. panoptic: ``panoptic/<stem>.png`` + ``panoptic.json``; instance: ``instances.json`` (COCO results);
    semantic: ``semantic/<stem>.png`` (the dataset's label values: category ids, + 1 when the bundle
    was trained with ``reduce_zero_label``); always ``overlays/<stem>.png``.
    ``task_part`` defaults to the model's task. Returns the written files.
    """
    out = Path(out_dir)
    part = task_part or bundle.config.task
    files = expand_inputs(list(inputs))
    to_dataset_id = bundle.categories.to_dataset_id
    panoptic = PanopticResultsWriter(out / "panoptic", to_dataset_id) if part == "panoptic" else None
    instances = CocoInstanceResultsWriter(to_dataset_id) if part == "instance" else None
    written: list[Path] = []
    for index, path in enumerate(files, start=1):
        image_id = image_id_of(path, index)
        image = np.asarray(Image.open(path).convert("RGB"))  # (h, w, 3) uint8
        (prediction,) = bundle.predict([image])
        if getattr(prediction, part) is None:
            raise ValueError(
                f"the model does not produce a {part} part; pick --task-part {bundle.config.task}"
            )
        if panoptic is not None:
            written.append(panoptic.add(prediction, image_id, path.name))
        if instances is not None:
            instances.add(prediction, image_id)
        if part == "semantic":
            written.append(
                write_semantic_png(
                    prediction,
                    out / "semantic" / f"{path.stem}.png",
                    to_dataset_id,
                    reduce_zero_label=bundle.reduce_zero_label,
                )
            )
        overlay_path = out / "overlays" / f"{path.stem}.png"
        overlay_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(draw_overlay(image, prediction, part, bundle.categories.names)).save(overlay_path)
        written.append(overlay_path)
    if panoptic is not None:
        written.append(panoptic.write(out / "panoptic.json"))
    if instances is not None:
        written.append(instances.write(out / "instances.json"))
    return written


def image_id_of(path: Path, index: int) -> int:
    """COCO convention: a numeric file stem is the image id (``000000000139.jpg`` -> 139), so results
    can be scored against the dataset's annotations; other names get their 1-based position."""
    return int(path.stem) if path.stem.isdigit() else index


def draw_overlay(image: np.ndarray, prediction: Prediction, part: TaskPart, names: list[str]) -> np.ndarray:
    """(h, w, 3) uint8 image blended 50/50 with one colour per segment, class names at segment centres."""
    segments, labels = _segments(prediction, part)  # (h, w) int64 0 = none; label per segment id - 1
    palette = np.random.default_rng(0).integers(40, 256, size=(len(labels) + 1, 3))
    colours = palette[segments].astype(np.float32)  # (h, w) -> (h, w, 3)
    blended = np.where(segments[..., None] > 0, 0.5 * image + 0.5 * colours, image).astype(np.uint8)
    canvas = Image.fromarray(blended)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for index, label in enumerate(labels, start=1):
        ys, xs = np.nonzero(segments == index)
        if len(ys):
            draw.text((int(xs.mean()), int(ys.mean())), names[label], fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def _segments(prediction: Prediction, part: TaskPart) -> tuple[np.ndarray, list[int]]:
    if part == "panoptic":
        return prediction.panoptic.segment_map.numpy().astype(np.int64), prediction.panoptic.labels.tolist()
    if part == "instance":
        masks = prediction.instance.masks.numpy()  # (M, h, w) bool, highest score first
        ids = np.zeros(masks.shape[1:], dtype=np.int64)
        for index in range(masks.shape[0] - 1, -1, -1):  # highest score painted last, on top
            ids[masks[index]] = index + 1
        return ids, prediction.instance.labels.tolist()
    label_map = prediction.semantic.label_map.numpy().astype(np.int64)
    classes = np.unique(label_map).tolist()
    ids = np.searchsorted(np.array(classes), label_map) + 1  # class -> 1..len(classes)
    return ids, classes


@torch.no_grad()
def evaluate_bundle(bundle: ModelBundle, experiment: Experiment) -> dict[str, float]:
    """The bundle's metrics on the experiment's val set (keys ``val/pq``, ``val/mask_ap``, ``val/miou``...),
    scored at each image's original size like ``knet evaluate-results`` on written files."""
    from knet_platform.knet_adapter import build_evaluators

    from knet.data import build_dataset, collate_batch
    from knet.evaluation import original_sizes, process_at_original_size

    if experiment.data.val is None:
        raise ValueError("the experiment has no data.val: add a val DataSource to evaluate on")
    # The bundle's category table: class ids mean what they meant in training (a DataError names the
    # val file when it lists other categories).
    dataset = build_dataset(experiment.data.val, bundle.transforms, train=False, categories=bundle.categories)
    evaluators = build_evaluators(bundle.config, bundle.categories.names)  # as validation in training
    loader = torch.utils.data.DataLoader(dataset, batch_size=bundle.batch_size, collate_fn=collate_batch)
    device = next(bundle.model.parameters()).device
    for evaluator in evaluators.values():
        evaluator.reset()
    for batch in loader:
        predictions = bundle.model(
            batch.images.to(device), image_sizes=batch.image_sizes, output_sizes=original_sizes(batch.metas)
        )
        predictions = [prediction_to_cpu(p) for p in predictions]
        process_at_original_size(evaluators.values(), predictions, batch.targets, batch.metas)
    metrics: dict[str, float] = {}
    for evaluator in evaluators.values():
        metrics.update({f"val/{k}": float(v) for k, v in evaluator.evaluate().items() if k != "per_class"})
    return metrics

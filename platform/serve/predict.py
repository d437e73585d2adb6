"""Prediction and evaluation from a model bundle (a folder, or an MLflow model URI downloaded to one).

from knet_platform.serve.predict import load_model
predictions = load_model("models:/quickstart@champion").predict([rgb_uint8_array])
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
from knet_platform.errors import KnetUserError
from knet_platform.knet_adapter import (
    CocoInstanceResultsWriter,
    KnetInputError,
    ModelBundle,
    PanopticResultsWriter,
    decode_image,
    load_bundle,
    render_overlay,
    write_semantic_png,
)
from PIL import Image

TaskPart = Literal["panoptic", "instance", "semantic"]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class InputNotFoundError(KnetUserError, FileNotFoundError):
    """An input to predict does not exist, or a folder holds no images."""


class ImageDecodeError(KnetUserError, ValueError):
    """An input to predict is not an image that can be decoded (empty, truncated, another format)."""


class OutputDirError(KnetUserError, FileExistsError):
    """``--out`` names an existing file, not a folder."""


class TaskPartError(KnetUserError, ValueError):
    """The prediction part asked for (``--task-part``) is one the model does not produce."""


def load_model(model_uri: str | Path, *, tracking_uri: str | None = None) -> ModelBundle:
    """A bundle from a local folder, or from ``models:/name@alias``, ``models:/name/<version>``,
    ``runs:/<run_id>/model`` or ``mlflow-artifacts:/...`` in the MLflow store (``tracking_uri``, default
    ``$MLFLOW_TRACKING_URI`` or the local store under ``$KNET_HOME``, as ``knet run`` writes it)."""
    if not is_mlflow_uri(str(model_uri)):
        return load_bundle(model_uri)
    from knet_platform.experiment.home import default_tracking_uri
    from knet_platform.tracking.registry import download_model  # MLflow only when a URI is given

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    with tempfile.TemporaryDirectory(prefix="knet-model-") as scratch:
        return load_bundle(download_model(str(model_uri), uri, scratch))


MLFLOW_URI_SCHEMES = ("models:", "runs:", "mlflow-artifacts:")


def is_mlflow_uri(model_uri: str) -> bool:
    """Whether ``model_uri`` is read through MLflow (its model URIs, or any ``scheme://``) rather than
    as a local bundle folder."""
    return model_uri.startswith(MLFLOW_URI_SCHEMES) or "://" in model_uri


def expand_inputs(inputs: list[Path]) -> list[Path]:
    """Image files, with folders expanded to their images (sorted)."""
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files.extend(sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif item.is_file():
            files.append(item)
        else:
            raise InputNotFoundError(f"input {item} does not exist: pass image files or folders")
    if not files:
        raise InputNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(map(str, inputs))}")
    return files


def predict_paths(
    bundle: ModelBundle,
    inputs: list[Path],
    out_dir: str | Path,
    *,
    task_part: TaskPart | None = None,
    score_threshold: float = 0.3,
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
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"--out {out} is a file: pass a folder to write the results into")
    for path in files:  # every input decodes before anything is written: no half-written results
        read_rgb(path)
    to_dataset_id = bundle.categories.to_dataset_id
    panoptic = PanopticResultsWriter(out / "panoptic", to_dataset_id) if part == "panoptic" else None
    instances = CocoInstanceResultsWriter(to_dataset_id) if part == "instance" else None
    written: list[Path] = []
    for index, path in enumerate(files, start=1):
        image_id = image_id_of(path, index)
        image = read_rgb(path)  # (h, w, 3) uint8
        (prediction,) = bundle.predict([image])
        if getattr(prediction, part) is None:
            raise TaskPartError(
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
        overlay = render_overlay(
            image, prediction, bundle.categories.names, part=part, score_threshold=score_threshold
        )
        Image.fromarray(overlay).save(overlay_path)
        written.append(overlay_path)
    if panoptic is not None:
        written.append(panoptic.write(out / "panoptic.json"))
    if instances is not None:
        written.append(instances.write(out / "instances.json"))
    return written


def read_rgb(path: Path) -> np.ndarray:
    """The image at ``path`` as uint8 (h, w, 3) RGB, fully decoded; ``ImageDecodeError`` naming the
    file when it is empty, truncated or not an image."""
    if path.stat().st_size == 0:
        raise ImageDecodeError(f"input {path} is empty (0 bytes): remove it or pass a complete image file")
    try:  # knet's one decoder, as training reads images: 16-bit grey by its high byte, not all-white
        return decode_image(path)  # (h, w, 3) uint8, every pixel decoded
    except (KnetInputError, Image.DecompressionBombError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise ImageDecodeError(
            f"input {path} is not an image that can be decoded ({reason}): remove it or convert it "
            f"to one of {', '.join(IMAGE_SUFFIXES)}"
        ) from None


def image_id_of(path: Path, index: int) -> int:
    """COCO convention: a numeric file stem is the image id (``000000000139.jpg`` -> 139), so results
    can be scored against the dataset's annotations; other names get their 1-based position."""
    return int(path.stem) if path.stem.isdigit() else index

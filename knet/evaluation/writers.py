"""Write predictions in the official result formats so they can be submitted or scored offline.

- instances: a COCO results JSON list (``image_id``, ``category_id``, ``segmentation`` RLE with str
  ``counts``, ``score``);
- panoptic: one PNG per image with the COCO RGB id encoding (id = R + 256 G + 256^2 B, 0 = VOID) and a
  JSON whose ``annotations`` carry ``segments_info``;
- semantic: one single-channel label PNG per image holding dataset ids.

Class ids are mapped back to dataset category ids with a ``to_dataset_id(contiguous_id) -> int`` callable
(e.g. ``CategoryTable``'s reverse mapping).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from knet.evaluation.instance import encode_masks
from knet.structures import PanopticPrediction, Prediction


def coco_instance_results(
    prediction: Prediction, image_id: int, to_dataset_id: Callable[[int], int]
) -> list[dict]:
    """One image's instance masks as COCO result entries."""
    if prediction.instance is None:
        raise ValueError("prediction has no instance part; enable inference.instance_on")
    instance = prediction.instance
    return [
        {
            "image_id": int(image_id),
            "category_id": int(to_dataset_id(int(label))),
            "segmentation": rle,
            "score": float(score),
        }
        for rle, label, score in zip(encode_masks(instance.masks.bool()), instance.labels, instance.scores)
    ]


class CocoInstanceResultsWriter:
    """Collects instance results image by image, then writes one COCO results JSON."""

    def __init__(self, to_dataset_id: Callable[[int], int]) -> None:
        self.to_dataset_id = to_dataset_id
        self.results: list[dict] = []

    def add(self, prediction: Prediction, image_id: int) -> None:
        self.results.extend(coco_instance_results(prediction, image_id, self.to_dataset_id))

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.results))
        return path


def ids_to_rgb(segment_map: np.ndarray) -> np.ndarray:
    """(H, W) int segment ids -> (H, W, 3) uint8 with id = R + 256 G + 256^2 B."""
    ids = segment_map.astype(np.int64)
    return np.stack([ids % 256, ids // 256 % 256, ids // 256**2 % 256], axis=-1).astype(np.uint8)


def rgb_to_ids(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) int64 segment ids (inverse of :func:`ids_to_rgb`)."""
    rgb = rgb.astype(np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


def panoptic_segments_info(panoptic: PanopticPrediction, to_dataset_id: Callable[[int], int]) -> list[dict]:
    """``segments_info`` for the segments that own at least one pixel (the format cannot hold others)."""
    segment_map = panoptic.segment_map.cpu().numpy()
    ids, areas = np.unique(segment_map, return_counts=True)
    info = []
    for segment_id, area in zip(ids.tolist(), areas.tolist()):
        if segment_id == 0:
            continue
        mask = np.asfortranarray((segment_map == segment_id).astype(np.uint8))
        bbox = mask_utils.toBbox(mask_utils.encode(mask)).tolist()
        info.append(
            {
                "id": int(segment_id),
                "category_id": int(to_dataset_id(int(panoptic.labels[segment_id - 1]))),
                "iscrowd": 0,
                "area": int(area),
                "bbox": [int(v) for v in bbox],
            }
        )
    return info


class PanopticResultsWriter:
    """Writes one RGB-id PNG per image into ``png_dir`` at ``add`` and the results JSON at ``write``."""

    def __init__(self, png_dir: str | Path, to_dataset_id: Callable[[int], int]) -> None:
        self.png_dir = Path(png_dir)
        self.png_dir.mkdir(parents=True, exist_ok=True)
        self.to_dataset_id = to_dataset_id
        self.annotations: list[dict] = []

    def add(self, prediction: Prediction, image_id: int, file_name: str) -> Path:
        """``file_name`` is the image's file name; the PNG gets the same stem."""
        if prediction.panoptic is None:
            raise ValueError("prediction has no panoptic part; enable inference.panoptic_on")
        png_name = Path(file_name).with_suffix(".png").name
        segment_map = prediction.panoptic.segment_map.cpu().numpy()
        if segment_map.size and int(segment_map.max()) >= 256**3:
            raise ValueError("more than 256^3 - 1 segments cannot be encoded in an RGB PNG")
        Image.fromarray(ids_to_rgb(segment_map)).save(self.png_dir / png_name)
        self.annotations.append(
            {
                "image_id": int(image_id),
                "file_name": png_name,
                "segments_info": panoptic_segments_info(prediction.panoptic, self.to_dataset_id),
            }
        )
        return self.png_dir / png_name

    def write(self, json_path: str | Path) -> Path:
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"annotations": self.annotations}))
        return json_path


def write_semantic_png(
    prediction: Prediction,
    path: str | Path,
    to_dataset_id: Callable[[int], int] | None = None,
    reduce_zero_label: bool = False,
) -> Path:
    """A single-channel label PNG of dataset ids: ``to_dataset_id`` (identity if None) is applied, then
    +1 when the dataset was read with ``reduce_zero_label`` (dataset id 0 = "other" was dropped)."""
    if prediction.semantic is None:
        raise ValueError("prediction has no semantic part; enable inference.semantic_on")
    label_map = prediction.semantic.label_map.cpu().numpy().astype(np.int64)
    if to_dataset_id is not None:
        classes = np.unique(label_map)
        lookup = {int(c): int(to_dataset_id(int(c))) for c in classes}
        label_map = np.vectorize(lookup.__getitem__, otypes=[np.int64])(label_map) if lookup else label_map
    if reduce_zero_label:
        label_map = label_map + 1
    if label_map.size and (label_map.min() < 0 or label_map.max() > 255):
        raise ValueError("semantic PNGs hold ids 0..255; got ids outside that range")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(label_map.astype(np.uint8)).save(path)
    return path

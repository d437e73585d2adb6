"""Score result files in the official formats against ground-truth files (``knet evaluate-results``).

- panoptic: COCO panoptic GT JSON + PNG folder vs a results JSON + PNG folder (pq_compute's inputs);
- instance: COCO instances GT JSON vs a COCO results JSON (COCOeval ``segm``);
- semantic: a GT label PNG folder vs a prediction PNG folder, files paired by stem.

The same evaluator classes as in training do the counting, so numbers agree with in-memory evaluation.
A bad file (not JSON, not the expected COCO layout, a PNG of another size than its ground truth, a
predicted segment listed but absent from its PNG, an id or category the ground truth does not have) is
one ``knet.errors.KnetInputError`` (a ``ValueError``) naming the file(s); nothing is skipped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from knet.errors import KnetInputError, KnetInputNotFoundError
from knet.evaluation.instance import coco_mask_metrics
from knet.evaluation.panoptic import PanopticEvaluator
from knet.evaluation.semantic import SemanticEvaluator
from knet.evaluation.writers import rgb_to_ids


def evaluate_results(
    task: Literal["panoptic", "instance", "semantic"],
    gt: str | Path,
    pred: str | Path,
    *,
    gt_masks: str | Path | None = None,
    pred_masks: str | Path | None = None,
    num_classes: int | None = None,
    reduce_zero_label: bool = False,
    ignore_index: int = 255,
) -> dict[str, float | dict]:
    """Metrics (percent) of result files.

    panoptic: ``gt``/``pred`` are JSON files, ``gt_masks``/``pred_masks`` their PNG folders (default:
    the JSON path without ``.json``, the COCO layout). instance: ``gt``/``pred`` are JSON files.
    semantic: ``gt``/``pred`` are PNG folders of class ids (contiguous ids, or contiguous + 1 with
    ``reduce_zero_label``, where GT 0 becomes ``ignore_index``); ``num_classes`` is required.
    """
    if task == "panoptic":
        return _evaluate_panoptic(Path(gt), Path(pred), gt_masks, pred_masks)
    if task == "instance":
        return _evaluate_instance(Path(gt), Path(pred))
    if task == "semantic":
        if num_classes is None:
            raise KnetInputError("semantic evaluation needs num_classes (the number of contiguous class ids)")
        return _evaluate_semantic(Path(gt), Path(pred), num_classes, reduce_zero_label, ignore_index)
    raise KnetInputError(f"task={task!r}: expected 'panoptic', 'instance' or 'semantic'")


def _read_json(path: Path, what: str) -> object:
    """Parse a result/ground-truth JSON; ``ValueError`` naming the file when missing or not JSON."""
    if not path.is_file():
        raise KnetInputNotFoundError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise KnetInputError(f"{what} file {path} is not valid JSON: {error}") from None


def _read_coco_json(path: Path, what: str, keys: tuple[str, ...]) -> dict:
    """A JSON object holding ``keys``; the error names the file and the missing keys."""
    data = _read_json(path, what)
    missing = [key for key in keys if key not in data] if isinstance(data, dict) else list(keys)
    if missing:
        found = ", ".join(sorted(data)) if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise KnetInputError(
            f"{path} is not a {what} JSON: it lacks the key(s) {', '.join(missing)} (found: {found or 'nothing'})"
        )
    for list_key in ("images", "annotations", "categories"):
        if list_key in keys and not isinstance(data[list_key], list):
            raise KnetInputError(
                f"{path}: '{list_key}' must be a list, found {type(data[list_key]).__name__}"
            )
    for entry_key in ("images", "categories"):
        if entry_key in keys and not all(isinstance(e, dict) and "id" in e for e in data[entry_key]):
            raise KnetInputError(f"{path}: every entry of '{entry_key}' needs an 'id'")
    return data


def _evaluate_instance(gt_json: Path, pred_json: Path) -> dict[str, float | dict]:
    gt_data = _read_coco_json(gt_json, "COCO instances ground-truth", ("images", "annotations", "categories"))
    results = _read_json(pred_json, "COCO results")
    if not isinstance(results, list):
        raise KnetInputError(
            f"{pred_json} is not a COCO results JSON: expected a list of "
            "{image_id, category_id, segmentation, score} entries, found a JSON object"
        )
    image_sizes = {_int_id(image["id"]): _image_size(image) for image in gt_data["images"]}
    category_ids = {_int_id(category["id"]) for category in gt_data["categories"]}
    for index, entry in enumerate(results):
        _check_result(entry, f"{pred_json}: result {index}", image_sizes, category_ids, gt_json)
    return coco_mask_metrics(gt_data, [_with_compressed_rle(entry, image_sizes) for entry in results])


def _with_compressed_rle(entry: dict, image_sizes: dict[object, tuple[int, int] | None]) -> dict:
    """A checked result whose segmentation is a compressed RLE: COCOeval's ``loadRes`` takes only
    that, and crashes on the polygons or uncompressed RLE the COCO results format also allows."""
    segmentation = entry["segmentation"]
    if isinstance(segmentation, dict) and isinstance(segmentation["counts"], str):
        return entry
    if isinstance(segmentation, list):
        height, width = image_sizes[entry["image_id"]] or (0, 0)
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    else:
        rle = mask_utils.frPyObjects(segmentation, *segmentation["size"])
    return entry | {"segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}}


def _int_id(value: object) -> object:
    """A ground-truth id as a set key: unhashable ids (a list) become their repr, never matching."""
    return value if isinstance(value, (int, str, float)) else repr(value)


def _image_size(image: dict) -> tuple[int, int] | None:
    """(height, width) of a ground-truth image entry, None when it does not state both as integers."""
    height, width = image.get("height"), image.get("width")
    if _is_int(height) and _is_int(width):
        return height, width
    return None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_result(
    entry: object,
    where: str,
    image_sizes: dict[object, tuple[int, int] | None],
    category_ids: set[object],
    gt_json: Path,
) -> None:
    """One COCO result entry is well-formed; else ``KnetInputError`` starting with ``where``.

    COCOeval trusts its input: a NaN score sorts anywhere, an RLE of garbage characters decodes to some
    mask, a list id raises a bare ``TypeError``. So every field is checked before scoring.
    """
    if not isinstance(entry, dict):
        raise KnetInputError(f"{where} is a JSON {type(entry).__name__}, not an object")
    missing = [k for k in ("image_id", "category_id", "segmentation", "score") if k not in entry]
    if missing:
        raise KnetInputError(f"{where} lacks {', '.join(missing)}")
    for key in ("image_id", "category_id"):
        if not _is_int(entry[key]):
            raise KnetInputError(f"{where}: {key} must be an integer, found {json.dumps(entry[key])}")
    if entry["image_id"] not in image_sizes:
        raise KnetInputError(
            f"{where} has image_id {entry['image_id']}, which is not among the images of {gt_json}"
        )
    if entry["category_id"] not in category_ids:
        raise KnetInputError(
            f"{where} has category_id {entry['category_id']}, which is not among "
            f"the categories of {gt_json} (COCOeval would silently ignore it)"
        )
    score = entry["score"]
    if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
        raise KnetInputError(f"{where}: score must be a finite number, found {json.dumps(score)}")
    problem = _segmentation_problem(entry["segmentation"], image_sizes[entry["image_id"]])
    if problem:
        raise KnetInputError(f"{where} (image_id {entry['image_id']}): segmentation {problem}")


def _segmentation_problem(segmentation: object, size: tuple[int, int] | None) -> str | None:
    """What is wrong with a COCO segmentation (RLE or polygons) of an image of ``size``, or None."""
    if isinstance(segmentation, list):
        if size is None:
            return "is a polygon list, but the ground-truth image states no height/width"
        polygons_ok = all(
            isinstance(polygon, list)
            and len(polygon) >= 6
            and len(polygon) % 2 == 0
            and all(_is_finite_number(v) for v in polygon)
            for polygon in segmentation
        )
        return None if polygons_ok else "must be a list of polygons [x0, y0, x1, y1, ...] of >= 3 points"
    if not isinstance(segmentation, dict) or not {"size", "counts"} <= set(segmentation):
        return f"must be an RLE {{size, counts}} or a polygon list, found {json.dumps(segmentation)[:60]}"
    rle_size = segmentation["size"]
    if not (
        isinstance(rle_size, list) and len(rle_size) == 2 and all(_is_int(v) and v >= 0 for v in rle_size)
    ):
        return f"size must be [height, width], found {json.dumps(rle_size)}"
    if size is not None and tuple(rle_size) != size:
        return f"size {rle_size} differs from the image's [height, width] {list(size)}"
    counts = segmentation["counts"]
    if isinstance(counts, str):
        runs = _rle_string_runs(counts)
        if runs is None:
            return "counts is not a COCO compressed RLE string (characters '0'..'o', as pycocotools writes)"
    elif isinstance(counts, list) and all(_is_int(v) for v in counts):
        runs = counts
    else:
        return "counts must be a compressed RLE string or a list of integer run lengths"
    if any(run < 0 for run in runs) or sum(runs) != rle_size[0] * rle_size[1]:
        return f"counts runs sum to {sum(runs)}, not height * width = {rle_size[0] * rle_size[1]}"
    return None


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _rle_string_runs(counts: str) -> list[int] | None:
    """Run lengths of a COCO compressed RLE string (pycocotools' ``rleFrString``), None if malformed.

    pycocotools decodes any bytes without complaint, so a corrupt string silently becomes some mask.
    Each run is 5-bit groups (char - 48) with a continuation bit 0x20 and a sign bit 0x10 on the last;
    from the third run on, a run is stored as the difference to the run two before.
    """
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                return None  # the string ends inside a run
            code = ord(counts[position]) - 48
            if not 0 <= code < 64:
                return None
            value |= (code & 0x1F) << shift
            more = bool(code & 0x20)
            position += 1
            shift += 5
            if not more and code & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _evaluate_panoptic(
    gt_json: Path, pred_json: Path, gt_masks: str | Path | None, pred_masks: str | Path | None
) -> dict[str, float | dict]:
    gt_data = _read_coco_json(gt_json, "COCO panoptic ground-truth", ("annotations", "categories"))
    pred_data = _read_coco_json(pred_json, "COCO panoptic results", ("annotations",))
    gt_dir = Path(gt_masks) if gt_masks is not None else gt_json.with_suffix("")
    pred_dir = Path(pred_masks) if pred_masks is not None else pred_json.with_suffix("")
    for folder, json_file in ((gt_dir, gt_json), (pred_dir, pred_json)):
        if not folder.is_dir():
            raise KnetInputNotFoundError(f"PNG folder {folder} of {json_file} does not exist")
    categories = sorted(gt_data["categories"], key=lambda c: (not c.get("isthing", 1), c["id"]))
    contiguous = {c["id"]: k for k, c in enumerate(categories)}  # things first, then stuff
    num_things = sum(1 for c in categories if c.get("isthing", 1))
    evaluator = PanopticEvaluator(
        num_things,
        len(categories) - num_things,
        class_names=[c.get("name", str(c["id"])) for c in categories],
    )
    for json_file, data in ((gt_json, gt_data), (pred_json, pred_data)):
        for index, ann in enumerate(data["annotations"]):
            _check_annotation(ann, f"{json_file}: annotation {index}")
    predictions = {ann["image_id"]: ann for ann in pred_data["annotations"]}
    for gt_ann in gt_data["annotations"]:
        pred_ann = predictions.get(gt_ann["image_id"])
        if pred_ann is None:
            raise KnetInputError(f"no prediction for image_id {gt_ann['image_id']} in {pred_json}")
        gt_png, pred_png = gt_dir / gt_ann["file_name"], pred_dir / pred_ann["file_name"]
        gt_rgb_ids, pred_rgb_ids = _read_png_ids(gt_png, gt_json), _read_png_ids(pred_png, pred_json)
        if gt_rgb_ids.shape != pred_rgb_ids.shape:
            raise KnetInputError(
                f"prediction {pred_png} is {pred_rgb_ids.shape} (h, w) but ground truth {gt_png} is "
                f"{gt_rgb_ids.shape}: write predictions at each image's original size"
            )
        gt_ids = _segment_rows(gt_rgb_ids, gt_png, gt_ann["segments_info"], gt_json, prediction=False)
        pred_ids = _segment_rows(
            pred_rgb_ids, pred_png, pred_ann["segments_info"], pred_json, prediction=True
        )
        gt_labels = _labels(gt_ann["segments_info"], contiguous, gt_json, gt_json)
        pred_labels = _labels(pred_ann["segments_info"], contiguous, pred_json, gt_json)
        iscrowd = torch.tensor([bool(s.get("iscrowd", 0)) for s in gt_ann["segments_info"]], dtype=torch.bool)
        evaluator.process_id_maps(gt_ids, gt_labels, iscrowd, pred_ids, pred_labels)
    return evaluator.evaluate()


def _check_annotation(ann: object, where: str) -> None:
    """A panoptic annotation entry has an integer image_id, a string file_name and a segments_info
    list of objects with integer id and category_id; else ``KnetInputError`` starting with ``where``
    (the file and the entry's index), so no malformed entry reaches the scoring as a traceback."""
    if not isinstance(ann, dict) or not {"image_id", "file_name", "segments_info"} <= set(ann):
        found = ", ".join(sorted(ann)) if isinstance(ann, dict) else f"a JSON {type(ann).__name__}"
        raise KnetInputError(
            f"{where} lacks image_id/file_name/segments_info (found: {found}); it is not a COCO panoptic JSON"
        )
    if not _is_int(ann["image_id"]):
        raise KnetInputError(f"{where}: image_id must be an integer, found {json.dumps(ann['image_id'])}")
    where = f"{where} (image_id {ann['image_id']})"
    if not isinstance(ann["file_name"], str) or not ann["file_name"]:
        raise KnetInputError(
            f"{where}: file_name must be the PNG's name (a string), found {json.dumps(ann['file_name'])}"
        )
    if not isinstance(ann["segments_info"], list):
        raise KnetInputError(
            f"{where}: segments_info must be a list (empty for no segment), found "
            f"{json.dumps(ann['segments_info'])[:60]}"
        )
    for index, segment in enumerate(ann["segments_info"]):
        if not isinstance(segment, dict) or not {"id", "category_id"} <= set(segment):
            raise KnetInputError(f"{where}: segment {index} lacks id/category_id: {segment}")
        for key in ("id", "category_id"):
            if not _is_int(segment[key]):
                raise KnetInputError(
                    f"{where}: segment {index} {key} must be an integer, found {json.dumps(segment[key])}"
                )


def _labels(
    segments_info: list[dict], contiguous: dict[int, int], json_file: Path, gt_json: Path
) -> torch.Tensor:
    unknown = [s["category_id"] for s in segments_info if s["category_id"] not in contiguous]
    if unknown:
        raise KnetInputError(
            f"{json_file}: category_id {unknown[0]} is not among the categories of {gt_json}"
        )
    return torch.tensor([contiguous[s["category_id"]] for s in segments_info], dtype=torch.int64)


def _read_png_ids(png: Path, json_file: Path) -> np.ndarray:
    """RGB-id PNG listed in ``json_file`` -> (H, W) int64 segment ids (id = R + 256 G + 256^2 B)."""
    if not png.is_file():
        raise KnetInputNotFoundError(f"PNG {png} listed in {json_file} does not exist")
    try:
        image = Image.open(png)
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise KnetInputError(f"cannot decode PNG {png} (listed in {json_file}): {error}") from None
    if image.mode.startswith("I") or image.mode == "F":  # convert("RGB") would clip ids to 255
        raise KnetInputError(
            f"PNG {png} (listed in {json_file}) is a {image.mode} (16-bit or float) image: "
            "segment ids must be 8-bit RGB (id = R + 256 G + 256^2 B)"
        )
    return rgb_to_ids(np.asarray(image.convert("RGB")))


def _segment_rows(
    ids: np.ndarray, png: Path, segments_info: list[dict], json_file: Path, *, prediction: bool
) -> torch.Tensor:
    """(H, W) PNG segment ids -> (H, W) int64 map with 0 = VOID and s + 1 = segments_info[s].

    Every non-zero id in the PNG must be in ``segments_info``; for a prediction every listed segment must
    also be in the PNG (pq_compute raises on both). A ground-truth segment missing from its PNG is kept, as
    pq_compute keeps it: it has no pixel, so it is a false negative unless it is crowd.
    """
    values, inverse = np.unique(ids, return_inverse=True)
    index = {s["id"]: k + 1 for k, s in enumerate(segments_info)}
    unknown = [int(v) for v in values if v != 0 and v not in index]
    if unknown:
        raise KnetInputError(
            f"{png}: segment ids {unknown[:5]} are in the PNG but not in its segments_info in {json_file}"
        )
    if prediction:
        absent = sorted(set(index) - {int(v) for v in values})
        if absent:
            raise KnetInputError(
                f"{png}: segment ids {absent[:5]} are in its segments_info in {json_file} but have no pixel "
                "in the PNG (pq_compute refuses this too; list only segments the PNG holds)"
            )
    lookup = np.array([index.get(int(v), 0) for v in values], dtype=np.int64)
    return torch.from_numpy(lookup[inverse.reshape(ids.shape)])


def _evaluate_semantic(
    gt_dir: Path, pred_dir: Path, num_classes: int, reduce_zero_label: bool, ignore_index: int
) -> dict[str, float | dict]:
    evaluator = SemanticEvaluator(num_classes=num_classes, ignore_index=ignore_index)
    gt_files = sorted(gt_dir.glob("*.png"))
    if not gt_files:
        raise KnetInputError(f"no ground-truth PNGs in {gt_dir}")
    for gt_file in gt_files:
        pred_file = pred_dir / gt_file.name
        if not pred_file.exists():
            raise KnetInputError(f"no prediction {pred_file} for ground truth {gt_file}")
        gt, pred = _read_label_png(gt_file), _read_label_png(pred_file)
        if reduce_zero_label:
            gt = np.where(gt == 0, ignore_index, np.where(gt == ignore_index, ignore_index, gt - 1))
            pred = pred - 1
        if gt.shape != pred.shape:
            raise KnetInputError(
                f"prediction {pred_file} is {pred.shape} (h, w) but ground truth {gt_file} is {gt.shape}"
            )
        try:
            evaluator.process_label_maps(torch.from_numpy(gt), torch.from_numpy(pred))
        except ValueError as error:
            raise KnetInputError(f"{pred_file} vs {gt_file}: {error}") from None
    return evaluator.evaluate()


def _read_label_png(path: Path) -> np.ndarray:
    """Single-channel label PNG -> (H, W) int64; ``ValueError`` naming the file when it is not one."""
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise KnetInputError(f"cannot decode label PNG {path}: {error}") from None
    if image.mode not in ("L", "P", "I", "I;16"):
        raise KnetInputError(f"label PNG {path} must be single-channel (class ids), found mode {image.mode}")
    return np.asarray(image, dtype=np.int64)

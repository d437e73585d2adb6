"""Decoding helpers shared by the readers: images, RGB-id PNGs, COCO segmentations."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from knet.data.errors import DataError


def read_json(path: str | Path, *, what: str) -> dict[str, Any]:
    """Parse a JSON file; ``DataError`` naming it when missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    try:
        with path.open() as handle:
            data = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{what} file {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise DataError(f"{what} file {path} must hold a JSON object, found {type(data).__name__}")
    return data


def require_keys(data: dict[str, Any], keys: tuple[str, ...], *, path: str | Path, what: str) -> None:
    missing = [k for k in keys if k not in data]
    if missing:
        raise DataError(
            f"{path} is not a {what} JSON: it lacks the key(s) {', '.join(missing)} "
            f"(found: {', '.join(sorted(data)) or 'nothing'})"
        )


def require_list(data: dict[str, Any], key: str, *, path: str | Path) -> list[Any]:
    """``data[key]`` as a list; ``DataError`` naming the file and the key when it is anything else."""
    value = data[key]
    if not isinstance(value, list):
        raise DataError(f"{path}: '{key}' must be a list, found {_json_type(value)}")
    return value


def require_entry(entry: Any, *, path: str | Path, where: str) -> dict[str, Any]:
    """One entry of a JSON list as an object; ``where`` names it (``images[3]``) in the error."""
    if not isinstance(entry, dict):
        raise DataError(f"{path}: {where} must be a JSON object, found {_json_type(entry)}")
    return entry


def require_field(
    entry: dict[str, Any], key: str, kind: type, *, path: str | Path, where: str, optional: bool = False
) -> Any:
    """``entry[key]`` of JSON type ``kind`` (``int`` excludes booleans); ``DataError`` naming the file,
    the entry and the field when it is missing or of another type. ``optional``: missing -> None."""
    if key not in entry:
        if optional:
            return None
        raise DataError(f"{path}: {where} lacks the field '{key}'")
    value = entry[key]
    if optional and value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = {int: "an integer", str: "a string", list: "a list", dict: "an object"}.get(
            kind, kind.__name__
        )
        raise DataError(f"{path}: {where} field '{key}' must be {expected}, found {_json_type(value)}")
    return value


def _json_type(value: Any) -> str:
    """How a JSON value reads in an error: its type and a short excerpt."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer"}
    if value is None:
        return "null"
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float)) else repr(value)
    return f"{names.get(type(value), type(value).__name__)} {text[:40]}"


def open_pil(source: str | Path | bytes, *, name: str) -> Image.Image:
    """Open and fully decode an image (path or encoded bytes); ``DataError`` naming ``name``."""
    try:
        handle = io.BytesIO(source) if isinstance(source, bytes) else source
        image = Image.open(handle)
        image.load()
    except FileNotFoundError:
        raise DataError(f"image file not found: {name}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise DataError(f"cannot decode image {name}: {error}") from None
    return image


# Integer modes PIL gives a >8-bit single-channel image (a 16-bit PNG opens as "I;16"). Their
# ``convert("RGB")`` clips every value above 255 to white, so they are scaled here instead.
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def read_rgb(source: str | Path | bytes, *, name: str | None = None) -> np.ndarray:
    """Any image file or encoded bytes -> uint8 (h, w, 3) RGB: the one image decoder of knet.

    16-bit grayscale (PIL modes ``I;16*``, ``I``) keeps its high byte (``value >> 8``), so a 16-bit
    PNG reads as the 8-bit image it shows rather than PIL's default of all-white; 16-bit RGB(A) PNGs
    PIL already reduces to 8 bits. A mode with no meaningful 8-bit RGB view (float, 32-bit values
    beyond 16 bits) is a ``DataError`` naming ``name`` (default: the path) rather than a wrong image.
    """
    if name is None:
        name = "<image bytes>" if isinstance(source, bytes) else str(source)
    image = open_pil(source, name=name)
    if image.mode in _WIDE_GRAY_MODES:
        gray = _gray16_to_uint8(np.asarray(image), image.mode, name=name)  # (h, w)
        return np.repeat(gray[..., None], 3, axis=-1)  # (h, w) -> (h, w, 3)
    if image.mode == "F":
        raise DataError(
            f"image {name} has float pixels (PIL mode F), which knet cannot read as RGB: "
            "save it as an 8-bit or 16-bit PNG/JPEG"
        )
    return np.array(image.convert("RGB"), dtype=np.uint8)  # (h, w, 3)


def _gray16_to_uint8(values: np.ndarray, mode: str, *, name: str) -> np.ndarray:
    """16-bit grey levels (h, w) -> uint8 (h, w) by their high byte; ``DataError`` if beyond 16 bits."""
    values = values.astype(np.int64)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise DataError(
            f"image {name} has pixel values in [{values.min()}, {values.max()}] (PIL mode {mode}), "
            "outside the 16-bit range knet reads: save it as an 8-bit or 16-bit PNG"
        )
    return (values >> 8).astype(np.uint8)


def decode_rgb(source: str | Path | bytes, *, name: str) -> torch.Tensor:
    """Image -> uint8 (3, h, w) RGB (``read_rgb``, channels first for the model)."""
    array = read_rgb(source, name=name)  # (h, w, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (h, w, 3) -> (3, h, w)


def decode_panoptic_ids(source: str | Path | bytes, *, name: str) -> torch.Tensor:
    """COCO panoptic PNG -> int64 (h, w) segment ids, id = R + 256 G + 256^2 B."""
    image = open_pil(source, name=name)
    if image.mode in (*_WIDE_GRAY_MODES, "F"):
        raise DataError(
            f"panoptic PNG {name} is a {image.mode} (16-bit or float) image: segment ids must be "
            "8-bit RGB (id = R + 256 G + 256^2 B)"
        )
    rgb = np.asarray(image.convert("RGB")).astype(np.int64)  # (h, w, 3)
    return torch.from_numpy(rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2])


def encode_panoptic_ids(ids: torch.Tensor) -> np.ndarray:
    """int (h, w) segment ids -> uint8 (h, w, 3) RGB for a PNG (inverse of ``decode_panoptic_ids``)."""
    ids = ids.to(torch.int64).numpy()
    return np.stack([ids % 256, (ids // 256) % 256, ids // (256 * 256)], axis=-1).astype(np.uint8)


def decode_label_png(source: str | Path | bytes, *, name: str) -> torch.Tensor:
    """Single-channel label PNG -> int64 (h, w)."""
    image = open_pil(source, name=name)
    if image.mode not in ("L", "P", "I", "I;16"):
        raise DataError(f"label map {name} must be a single-channel PNG, found mode {image.mode}")
    return torch.from_numpy(np.asarray(image).astype(np.int64))


def decode_coco_segmentation(segmentation: Any, height: int, width: int, *, name: str) -> torch.Tensor:
    """COCO polygon list / uncompressed RLE / compressed RLE -> bool (h, w), via pycocotools."""
    try:
        if isinstance(segmentation, list):  # polygons: list of [x0, y0, x1, y1, ...]
            rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        elif isinstance(segmentation.get("counts"), list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:  # compressed RLE
            counts = segmentation["counts"]
            rle = {
                "size": segmentation["size"],
                "counts": counts.encode() if isinstance(counts, str) else counts,
            }
        decoded = mask_utils.decode(rle)
    except (TypeError, KeyError, ValueError, AttributeError) as error:
        raise DataError(f"bad segmentation in {name}: {error}") from None
    if decoded.shape[:2] != (height, width):
        raise DataError(f"segmentation in {name} has size {decoded.shape[:2]}, image is {(height, width)}")
    return torch.from_numpy(decoded.astype(bool))

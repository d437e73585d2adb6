"""Drawing a prediction over its image: one overlay renderer for every caller (``knet predict``,
the overlays logged during training, notebooks).

Colours are fixed per class id (``class_colour``), so a class looks the same in every image and every
tool; thing instances of one class get slightly lighter or darker shades of it, so neighbours are told
apart. Each segment's name is written at the point deepest inside it (the maximum of its distance
transform, preferring points where the whole text fits), never at its centroid, which for a ring or
an L-shaped "background" lies on another object. The legend is a strip appended to the right of the image, so it never hides the picture.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from knet.structures import Prediction

PARTS = ("panoptic", "instance", "semantic")
LEGEND_BACKGROUND = (32, 32, 32)
_GOLDEN = 0.618033988749895  # successive hues this far apart stay far apart for any number of classes


@dataclass
class Segment:
    """One drawn region: mask (h, w) bool (its visible pixels), class id, colour RGB."""

    mask: np.ndarray
    class_id: int
    colour: tuple[int, int, int]


def class_colour(class_id: int) -> tuple[int, int, int]:
    """The fixed RGB colour of a contiguous class id: saturated, mid-bright hues (readable under white
    text with a black outline), successive ids far apart on the colour wheel."""
    hue = (0.05 + class_id * _GOLDEN) % 1.0
    value = (0.95, 0.8)[class_id % 2]  # alternate brightness too, so close hues still differ
    red, green, blue = colorsys.hsv_to_rgb(hue, 0.7, value)
    return round(red * 255), round(green * 255), round(blue * 255)


def instance_colour(class_id: int, index: int) -> tuple[int, int, int]:
    """The colour of the ``index``-th instance (0 = the first drawn) of a class: the class colour, then
    alternately darker and lighter shades of it."""
    base = np.array(class_colour(class_id), dtype=np.float64)
    step = min(0.18 * math.ceil(index / 2), 0.54)
    shaded = base * (1 - step) if index % 2 == 1 else base + (255 - base) * step
    red, green, blue = (round(float(c)) for c in shaded)
    return red, green, blue


def render_overlay(
    image: np.ndarray,
    prediction: Prediction,
    class_names: list[str],
    *,
    part: str | None = None,
    score_threshold: float = 0.3,
    alpha: float = 0.5,
) -> np.ndarray:
    """``image`` (h, w, 3) uint8 RGB with the prediction's segments blended in, labelled, and a legend.

    part: "panoptic", "instance" or "semantic"; None = the first of those the prediction has.
    score_threshold: instance masks scoring below it are not drawn (the model keeps low-scoring masks
    for mask AP); panoptic and semantic segments are all drawn. alpha: the colour's weight.
    The prediction must be at the image's size (``Prediction.resized``). Returns (h', w + legend, 3)
    uint8: the overlay in ``[:h, :w]``, a legend strip (one swatch and name per class drawn, by class
    id) to its right, h' = max(h, the legend's height); just (h, w, 3) when nothing is drawn.
    """
    height, width = image.shape[:2]
    segments = _segments(prediction, _pick_part(prediction, part), score_threshold)
    for segment in segments:
        if segment.mask.shape != (height, width):
            raise ValueError(
                f"the prediction is {segment.mask.shape} but the image is {(height, width)}: "
                "pass prediction.resized(image.shape[:2])"
            )
    canvas = Image.fromarray(_blend(image[..., :3], segments, alpha))
    draw = ImageDraw.Draw(canvas)
    font_size = int(np.clip(round(min(height, width) / 22), 12, 48))  # 12 px up to 264 px images
    font = _font(font_size)
    stroke = max(1, round(font_size / 8))
    for segment in segments:
        name = _name(class_names, segment.class_id)
        left, top, right, bottom = draw.textbbox((0, 0), name, font=font, stroke_width=stroke)
        # Segments less than half a line deep go unlabelled (the legend still names their class).
        anchor = label_anchor(segment.mask, (bottom - top, right - left), min_depth=font_size / 2)
        if anchor is not None:
            _outlined_text(draw, (anchor[1], anchor[0]), name, font, stroke)
    entries = _legend(segments, class_names)
    if not entries:
        return np.asarray(canvas)
    return _with_legend(np.asarray(canvas), entries, font, font_size)


def legend_entries(
    prediction: Prediction,
    class_names: list[str],
    *,
    part: str | None = None,
    score_threshold: float = 0.3,
) -> list[tuple[str, tuple[int, int, int]]]:
    """The (class name, colour) rows ``render_overlay`` puts in its legend: each class drawn, once, by id."""
    segments = _segments(prediction, _pick_part(prediction, part), score_threshold)
    return _legend(segments, class_names)


def label_anchor(
    mask: np.ndarray, text_size: tuple[int, int] = (1, 1), min_depth: float = 0.0
) -> tuple[int, int] | None:
    """Where to centre a label of ``text_size`` (height, width) pixels on ``mask`` (h, w) bool, as
    (row, col): the deepest point of the mask (farthest from its outside; the image border counts as
    outside) among those where the whole text fits inside it, else the deepest point at all. Inside
    the segment even when it is not convex. None when the mask is not ``min_depth`` deep anywhere
    (too small to hold a label)."""
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    if rows.size == 0:
        return None
    top, left = int(rows[0]), int(cols[0])
    box = np.pad(mask[top : int(rows[-1]) + 1, left : int(cols[-1]) + 1], 1)  # (bh + 2, bw + 2)
    depth = ndimage.distance_transform_edt(box)
    if depth.max() < min_depth:
        return None
    odd = (text_size[0] // 2 * 2 + 1, text_size[1] // 2 * 2 + 1)  # centred on the pixel
    fits = ndimage.minimum_filter(box.astype(np.uint8), size=odd, mode="constant", cval=0) > 0
    score = np.where(fits, depth, -1.0) if fits.any() else depth
    row, col = np.unravel_index(int(np.argmax(score)), score.shape)
    return top + int(row) - 1, left + int(col) - 1


def _pick_part(prediction: Prediction, part: str | None) -> str:
    if part is None:
        for name in PARTS:
            if getattr(prediction, name) is not None:
                return name
        raise ValueError("the prediction has no panoptic, instance or semantic part to draw")
    if part not in PARTS:
        raise ValueError(f"part={part!r}: use one of {', '.join(PARTS)}")
    if getattr(prediction, part) is None:
        present = [name for name in PARTS if getattr(prediction, name) is not None]
        raise ValueError(f"the prediction has no {part} part; it has {', '.join(present) or 'none'}")
    return part


def _segments(prediction: Prediction, part: str, score_threshold: float) -> list[Segment]:
    """The visible segments of one part, in drawing order, with their colours."""
    if part == "semantic":
        label_map = prediction.semantic.label_map.cpu().numpy()  # (h, w)
        return [Segment(label_map == c, int(c), class_colour(int(c))) for c in np.unique(label_map)]
    if part == "panoptic":
        panoptic = prediction.panoptic
        ids = panoptic.segment_map.cpu().numpy()  # (h, w), 0 = VOID, segment i at row i - 1
        labels = panoptic.labels.cpu().tolist()
        things = panoptic.is_thing.cpu().tolist()
    else:
        instance = prediction.instance
        keep = (instance.scores >= score_threshold).cpu().numpy()
        masks = instance.masks.cpu().numpy()[keep]  # (M, h, w) bool, highest score first
        labels = instance.labels.cpu().numpy()[keep].tolist()
        things = [True] * len(labels)
        ids = np.zeros(masks.shape[1:], dtype=np.int64)
        for index in range(masks.shape[0] - 1, -1, -1):  # the highest score painted last, on top
            ids[masks[index]] = index + 1
    segments: list[Segment] = []
    seen: dict[int, int] = {}  # class id -> thing instances of it drawn so far
    for index, (label, is_thing) in enumerate(zip(labels, things), start=1):
        mask = ids == index
        if not mask.any():
            continue
        colour = class_colour(label)
        if is_thing:
            colour = instance_colour(label, seen.get(label, 0))
            seen[label] = seen.get(label, 0) + 1
        segments.append(Segment(mask, int(label), colour))
    return segments


def _blend(image: np.ndarray, segments: list[Segment], alpha: float) -> np.ndarray:
    """Each segment's pixels: ``(1 - alpha) * image + alpha * colour``, rounded; the rest unchanged."""
    ids = np.zeros(image.shape[:2], dtype=np.int64)  # (h, w), 0 = not drawn
    for index, segment in enumerate(segments, start=1):
        ids[segment.mask] = index
    colours = np.array([(0, 0, 0)] + [s.colour for s in segments], dtype=np.float64)[ids]  # (h, w, 3)
    blended = np.rint((1 - alpha) * image.astype(np.float64) + alpha * colours).clip(0, 255)
    return np.where(ids[..., None] > 0, blended.astype(np.uint8), image)


def _outlined_text(
    draw: ImageDraw.ImageDraw, centre: tuple[int, int], text: str, font: ImageFont.ImageFont, stroke: int
) -> None:
    """White text with a ``stroke``-pixel black outline centred on ``centre`` (x, y): readable on any
    colour; shifted inwards where it would cross the image's edge (a segment at the border)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
    width, height = draw.im.size
    x = min(max(centre[0] - (left + right) / 2, -left), width - right)
    y = min(max(centre[1] - (top + bottom) / 2, -top), height - bottom)
    origin = (x, y)
    draw.text(origin, text, fill=(255, 255, 255), font=font, stroke_width=stroke, stroke_fill=(0, 0, 0))


def _legend(segments: list[Segment], class_names: list[str]) -> list[tuple[str, tuple[int, int, int]]]:
    classes = sorted({segment.class_id for segment in segments})
    return [(_name(class_names, class_id), class_colour(class_id)) for class_id in classes]


def _with_legend(
    overlay: np.ndarray,
    entries: list[tuple[str, tuple[int, int, int]]],
    font: ImageFont.ImageFont,
    size: int,
) -> np.ndarray:
    """``overlay`` with a strip to its right: per row a ``size`` x ``size`` swatch and the class name."""
    height, width = overlay.shape[:2]
    pad, row_height = max(2, size // 3), size + max(2, size // 3)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = max(int(measure.textlength(name, font=font)) for name, _ in entries)
    strip_width = pad + size + pad + text_width + pad
    canvas = Image.new(
        "RGB", (width + strip_width, max(height, pad + row_height * len(entries))), LEGEND_BACKGROUND
    )
    canvas.paste(Image.fromarray(overlay), (0, 0))
    draw = ImageDraw.Draw(canvas)
    for index, (name, colour) in enumerate(entries):
        top = pad + index * row_height
        draw.rectangle((width + pad, top, width + pad + size - 1, top + size - 1), fill=colour)
        _, text_top, _, text_bottom = draw.textbbox((0, 0), name, font=font)
        origin = (width + 2 * pad + size, top + (size - text_top - text_bottom) / 2)
        draw.text(origin, name, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at ``size`` pixels (Pillow >= 10.1); older Pillow has one fixed small size."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _name(class_names: list[str], class_id: int) -> str:
    return class_names[class_id] if 0 <= class_id < len(class_names) else f"class_{class_id}"

"""Synthetic shape scenes written as real COCO instance, COCO panoptic and semantic datasets.

Three thing classes (circle, square, triangle: overlapping instances of varied size, a class
colour with jitter) over two textured stuff classes (sky above a wavy horizon, ground below);
now and then a crowd of small circles (``iscrowd=1``). Shapes are polygons rasterised with
pycocotools, so a polygon written to the instance JSON decodes to exactly the in-memory mask;
occluded instances and crowds are written as RLE (compressed and uncompressed). Everything is a
pure function of ``(seed, image index)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from knet.data.categories import Category, CategoryTable
from knet.data.config import DataSource
from knet.data.io import encode_panoptic_ids
from knet.errors import KnetInputError

THINGS = (Category(1, "circle", True), Category(2, "square", True), Category(3, "triangle", True))
STUFF = (Category(11, "sky", False), Category(12, "ground", False))
CATEGORIES = THINGS + STUFF
# semantic label PNG value = index in CATEGORIES + 1 (0 = unlabelled; read with reduce_zero_label)
_THING_RGB = {1: (220, 40, 40), 2: (230, 200, 30), 3: (200, 50, 210)}
_SPLITS = ("train", "val")
_VERSION = 1


@dataclass
class Segment:
    """One ground-truth segment; ``polygon`` is set when the visible mask is exactly its raster."""

    category_id: int
    mask: torch.Tensor  # (H, W) bool
    iscrowd: bool = False
    polygon: list[float] | None = None


@dataclass
class Scene:
    """An image (uint8 (3, H, W)) and its panoptic segments (things, then stuff; no overlaps)."""

    image: torch.Tensor
    segments: list[Segment]

    def target(self, table: CategoryTable, *, things_only: bool = False) -> dict[str, Any]:
        """The target dict the readers must return for this scene (panoptic / instance view)."""
        segs = [s for s in self.segments if not things_only or s.category_id in _THING_RGB]
        h, w = self.image.shape[-2:]
        return {
            "labels": torch.tensor([table.to_contiguous(s.category_id) for s in segs], dtype=torch.int64),
            "masks": torch.stack([s.mask for s in segs]) if segs else torch.zeros(0, h, w, dtype=torch.bool),
            "iscrowd": torch.tensor([s.iscrowd for s in segs], dtype=torch.bool),
        }

    def label_map(self) -> torch.Tensor:
        """int64 (H, W) semantic class index into ``CATEGORIES`` (255 = unlabelled)."""
        out = torch.full(self.image.shape[-2:], 255, dtype=torch.int64)
        index = {c.id: k for k, c in enumerate(CATEGORIES)}
        for s in self.segments:
            out[s.mask] = index[s.category_id]
        return out


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (), generator=g).item())


def _raster(polygon: list[float], h: int, w: int) -> torch.Tensor:
    rle = mask_utils.frPyObjects([polygon], h, w)
    return torch.from_numpy(mask_utils.decode(rle)[..., 0].astype(bool))


def _shape_polygon(g: torch.Generator, kind: int, h: int, w: int) -> list[float]:
    """Flat [x0, y0, ...] polygon, rounded to 2 decimals (exactly what the JSON stores)."""
    size = min(h, w) * _uniform(g, 0.08, 0.2)  # radius-like
    cx, cy = _uniform(g, size, w - size), _uniform(g, size * 0.5, h - size * 0.5)
    turn = _uniform(g, 0, 2 * math.pi)
    corners = {1: 20, 2: 4, 3: 3}[kind]
    points = []
    for k in range(corners):
        angle = turn + 2 * math.pi * k / corners
        radius = size * (1.3 if kind == 2 else 1.0)
        points += [round(cx + radius * math.cos(angle), 2), round(cy + radius * math.sin(angle), 2)]
    return points


def _texture(
    g: torch.Generator, rgb: tuple[float, float, float], h: int, w: int, stripes: float
) -> torch.Tensor:
    """float (3, H, W): a colour with a stripe pattern and noise."""
    ys = torch.arange(h, dtype=torch.float32)[:, None]
    xs = torch.arange(w, dtype=torch.float32)[None, :]
    phase, freq = _uniform(g, 0, 6.28), _uniform(g, 0.2, 0.5)
    pattern = stripes * torch.sin(freq * ys + 0.3 * freq * xs + phase)  # (H, W)
    noise = 8 * torch.randn(3, h, w, generator=g)
    return torch.tensor(rgb)[:, None, None] + pattern[None] + noise


def render_scene(seed: int, index: int, image_size: tuple[int, int]) -> Scene:
    """The scene of image ``index`` of the dataset generated with ``seed`` (deterministic)."""
    h, w = image_size
    g = torch.Generator().manual_seed(seed * 100_003 + index)
    ys = torch.arange(h, dtype=torch.float32)[:, None]
    xs = torch.arange(w, dtype=torch.float32)[None, :]
    horizon = _uniform(g, 0.3, 0.6) * h + _uniform(g, 0.02, 0.08) * h * torch.sin(
        xs * _uniform(g, 0.02, 0.08) + _uniform(g, 0, 6.28)
    )
    sky = (ys < horizon).expand(h, w)  # (H, W)
    image = torch.where(
        sky[None],
        _texture(g, (110, 160, 235), h, w, 10),
        _texture(g, (95, 125, 60), h, w, 25),
    )
    # things, bottom to top; a crowd (small circles, one segment) sometimes lies underneath
    layers: list[tuple[int, torch.Tensor, list[float] | None, bool]] = []
    if torch.rand((), generator=g).item() < 0.2:
        crowd = torch.zeros(h, w, dtype=torch.bool)
        for _ in range(_randint(g, 4, 7)):
            r = min(h, w) * _uniform(g, 0.025, 0.045)
            cx, cy = _uniform(g, 0.1, 0.9) * w, _uniform(g, 0.1, 0.9) * h
            crowd |= (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
        layers.append((1, crowd, None, True))
    for _ in range(_randint(g, 1, 4)):
        kind = _randint(g, 1, 3)
        polygon = _shape_polygon(g, kind, h, w)
        layers.append((kind, _raster(polygon, h, w), polygon, False))
    min_area = max(8, int(0.002 * h * w))
    visible = _visible([m for _, m, _, _ in layers])
    keep = [k for k, v in enumerate(visible) if int(v.sum()) >= min_area]
    layers = [layers[k] for k in keep]
    visible = _visible([m for _, m, _, _ in layers])
    segments = []
    for (kind, full, polygon, crowd), mask in zip(layers, visible):
        rgb = torch.tensor(_THING_RGB[kind], dtype=torch.float32) + 25 * torch.randn(3, generator=g)
        image = torch.where(full[None], rgb[:, None, None] + 6 * torch.randn(3, h, w, generator=g), image)
        exact = polygon is not None and torch.equal(mask, full)
        segments.append(Segment(kind, mask, crowd, polygon if exact else None))
    covered = torch.zeros(h, w, dtype=torch.bool)
    for s in segments:
        covered |= s.mask
    for category, region in ((STUFF[0], sky), (STUFF[1], ~sky)):
        mask = region & ~covered
        if mask.any():
            segments.append(Segment(category.id, mask))
    return Scene(image.round().clamp(0, 255).to(torch.uint8), segments)


def _visible(masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Visible part of each layer (later layers on top)."""
    out, above = [], None
    for mask in reversed(masks):
        out.append(mask if above is None else mask & ~above)
        above = mask.clone() if above is None else above | mask
    return out[::-1]


@dataclass
class SyntheticDataset:
    """Where ``synthesize`` wrote everything; ``source(format, split)`` gives a ready DataSource.

    Layout under ``out_dir``::

        images/{train,val}/000001.png             RGB images (shared by all formats)
        coco_instance/{train,val}.json            COCO instances (things; polygons + RLE, crowds)
        coco_panoptic/{train,val}.json            COCO panoptic JSON (things + stuff, isthing)
        coco_panoptic/{train,val}/000001.png      RGB segment-id PNGs
        semantic/{train,val}/000001.png           label PNGs (0 = unlabelled, class k -> k + 1)
        semantic/categories.json                  COCO categories list for the semantic labels
        synthetic.json                            generator parameters (re-used when equal)
    """

    out_dir: Path
    seed: int
    image_size: tuple[int, int]
    num_train: int
    num_val: int

    def source(self, format: str, split: str) -> DataSource:
        if split not in _SPLITS:
            raise ValueError(f"split={split!r}: use 'train' or 'val'")
        root = self.out_dir
        images = str(root / "images" / split)
        if format == "coco_instance":
            return DataSource(
                format, images=images, annotations=str(root / "coco_instance" / f"{split}.json")
            )
        if format == "coco_panoptic":
            return DataSource(
                format,
                images=images,
                annotations=str(root / "coco_panoptic" / f"{split}.json"),
                masks=str(root / "coco_panoptic" / split),
            )
        if format == "semantic":
            return DataSource(
                format,
                images=images,
                masks=str(root / "semantic" / split),
                annotations=str(root / "semantic" / "categories.json"),
                reduce_zero_label=True,
            )
        raise ValueError(f"format={format!r}: use coco_instance, coco_panoptic or semantic")

    def image_ids(self, split: str) -> list[int]:
        """Image ids of a split (1-based over the whole dataset: train first, then val)."""
        start = 1 if split == "train" else 1 + self.num_train
        return list(range(start, start + (self.num_train if split == "train" else self.num_val)))

    def scene(self, split: str, position: int) -> Scene:
        """The in-memory ground truth of the ``position``-th image of ``split``."""
        return render_scene(self.seed, self.image_ids(split)[position], self.image_size)


def synthesize(
    out_dir: str | Path,
    num_images: int,
    seed: int,
    image_size: tuple[int, int] = (128, 128),
    val_fraction: float = 0.25,
) -> SyntheticDataset:
    """Write ``num_images`` synthetic scenes (train + val) in all three formats (layout: see
    ``SyntheticDataset``). Re-uses ``out_dir`` when it already holds the same parameters."""
    h, w = (int(v) for v in image_size)
    if num_images < 2:
        raise KnetInputError(f"num_images={num_images}: need at least 2 (one train, one val image)")
    if not 0.0 < val_fraction < 1.0:
        raise KnetInputError(f"val_fraction={val_fraction} must be in (0, 1)")
    if h < 32 or w < 32:
        raise KnetInputError(f"image_size={image_size}: use at least (32, 32)")
    num_val = min(num_images - 1, max(1, round(num_images * val_fraction)))
    root = Path(out_dir)
    dataset = SyntheticDataset(root, int(seed), (h, w), num_images - num_val, num_val)
    params = {
        "version": _VERSION,
        "num_images": num_images,
        "seed": int(seed),
        "image_size": [h, w],
        "val_fraction": val_fraction,
    }
    marker = root / "synthetic.json"
    if marker.is_file() and json.loads(marker.read_text()) == params:
        return dataset
    for split in _SPLITS:
        _write_split(dataset, split)
    (root / "semantic" / "categories.json").write_text(
        json.dumps(
            {
                "categories": [{"id": k, "name": c.name} for k, c in enumerate(CATEGORIES)],
                "reduce_zero_label": True,  # read by detect_source (``knet data check``)
            },
            indent=1,
        )
    )
    marker.write_text(json.dumps(params))
    return dataset


def _bbox(mask: torch.Tensor) -> list[int]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]


def _uncompressed_rle(mask: torch.Tensor) -> dict[str, Any]:
    """COCO uncompressed RLE: run lengths over column-major pixels, starting with zeros."""
    flat = mask.t().reshape(-1).to(torch.int8)  # (H, W) -> (W * H,) column-major
    change = torch.nonzero(flat[1:] != flat[:-1]).flatten() + 1
    bounds = torch.cat([torch.tensor([0]), change, torch.tensor([flat.numel()])])
    runs = (bounds[1:] - bounds[:-1]).tolist()
    if flat[0] == 1:
        runs = [0] + runs
    return {"size": list(mask.shape), "counts": runs}


def _segmentation(segment: Segment) -> Any:
    if segment.polygon is not None:
        return [segment.polygon]
    if segment.iscrowd:
        return _uncompressed_rle(segment.mask)
    rle = mask_utils.encode(np.asfortranarray(segment.mask.numpy().astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _write_split(dataset: SyntheticDataset, split: str) -> None:
    root = dataset.out_dir
    h, w = dataset.image_size
    dirs = {name: root / name / split for name in ("images", "coco_panoptic", "semantic")}
    for folder in [*dirs.values(), root / "coco_instance"]:
        folder.mkdir(parents=True, exist_ok=True)
    images, instances, panoptic = [], [], []
    ann_id = 1
    semantic_index = {c.id: k for k, c in enumerate(CATEGORIES)}
    for position, image_id in enumerate(dataset.image_ids(split)):
        scene = dataset.scene(split, position)
        name = f"{image_id:06d}.png"
        Image.fromarray(scene.image.permute(1, 2, 0).numpy()).save(dirs["images"] / name)
        images.append({"id": image_id, "file_name": name, "height": h, "width": w})
        g = torch.Generator().manual_seed(dataset.seed * 7919 + image_id)
        ids = torch.zeros(h, w, dtype=torch.int64)
        labels = torch.zeros(h, w, dtype=torch.uint8)
        segments_info, used = [], set()
        for segment in scene.segments:
            seg_id = 0
            while seg_id == 0 or seg_id in used:
                seg_id = int(torch.randint(1, 256**3, (), generator=g))
            used.add(seg_id)
            ids[segment.mask] = seg_id
            labels[segment.mask] = semantic_index[segment.category_id] + 1
            info = {
                "id": seg_id,
                "category_id": segment.category_id,
                "iscrowd": int(segment.iscrowd),
                "area": int(segment.mask.sum()),
                "bbox": _bbox(segment.mask),
            }
            segments_info.append(info)
            if segment.category_id in _THING_RGB:
                instances.append(
                    {
                        "id": ann_id,
                        "image_id": image_id,
                        "category_id": segment.category_id,
                        "segmentation": _segmentation(segment),
                        "area": info["area"],
                        "bbox": info["bbox"],
                        "iscrowd": int(segment.iscrowd),
                    }
                )
                ann_id += 1
        Image.fromarray(encode_panoptic_ids(ids)).save(dirs["coco_panoptic"] / name)
        Image.fromarray(labels.numpy(), mode="L").save(dirs["semantic"] / name)
        panoptic.append({"image_id": image_id, "file_name": name, "segments_info": segments_info})
    cats = [
        {
            "id": c.id,
            "name": c.name,
            "isthing": int(c.isthing),
            "supercategory": "shape" if c.isthing else "scene",
        }
        for c in CATEGORIES
    ]
    (root / "coco_instance" / f"{split}.json").write_text(
        json.dumps(
            {"images": images, "annotations": instances, "categories": [c for c in cats if c["isthing"]]}
        )
    )
    (root / "coco_panoptic" / f"{split}.json").write_text(
        json.dumps({"images": images, "annotations": panoptic, "categories": cats})
    )

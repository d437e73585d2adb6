"""Readers: one dataset format each -> per-image (uint8 image (3, h, w), target dict, meta dict).

Targets follow docs/interfaces.md §1 (contiguous ids, things first). Cheap checks (JSON shape,
files exist, every image has its annotation entry and every annotation its image, category ids
known) run at construction so errors come before training starts; with ``skip_invalid=True`` the
images (or orphan annotations / label maps) failing them are dropped with one logged warning and a
count. What only decoding can find (a corrupt file, a PNG disagreeing with its JSON) is found by
``read``: a ``DataError`` naming the file, which ``KNetDataset`` skips under ``skip_invalid``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from knet.data.categories import Category, CategoryTable
from knet.data.config import DataSource
from knet.data.errors import DataError
from knet.data.io import (
    decode_coco_segmentation,
    decode_label_png,
    decode_panoptic_ids,
    decode_rgb,
    read_json,
    require_entry,
    require_field,
    require_keys,
    require_list,
)

log = logging.getLogger(__name__)

Sample = tuple[torch.Tensor, dict[str, Any], dict[str, Any]]


@dataclass(frozen=True)
class ImageRecord:
    """One image of a split: where its pixels and annotations are."""

    image_id: int
    file_name: str
    image_path: Path
    height: int | None = None
    width: int | None = None
    annotation: Any = None  # format-specific: COCO anns list, panoptic entry, label path


def _empty_target(height: int, width: int, image_id: int) -> dict[str, Any]:
    return {
        "labels": torch.zeros(0, dtype=torch.int64),
        "masks": torch.zeros(0, height, width, dtype=torch.bool),
        "iscrowd": torch.zeros(0, dtype=torch.bool),
        "image_id": image_id,
    }


class _Skipper:
    """Collects construction-time problems: raise at once, or drop and warn once with a count."""

    def __init__(self, skip_invalid: bool, source: str) -> None:
        self.skip_invalid = skip_invalid
        self.source = source
        self.problems: list[str] = []

    def __call__(self, message: str) -> None:
        if not self.skip_invalid:
            raise DataError(message)
        self.problems.append(message)

    def finish(self, kept: int) -> None:
        if self.problems:
            log.warning(
                "%s: skipped %d invalid image(s) or annotation(s) (skip_invalid=True), first: %s",
                self.source,
                len(self.problems),
                self.problems[0],
            )
        if kept == 0:
            raise DataError(f"{self.source}: the dataset is empty (no valid images)")


class Reader:
    """Base: a list of ``ImageRecord`` + a ``CategoryTable``; subclasses decode one record."""

    categories: CategoryTable
    records: list[ImageRecord]
    problems: list[str]

    def __len__(self) -> int:
        return len(self.records)

    def read(self, index: int) -> Sample:
        record = self.records[index]
        image = decode_rgb(record.image_path, name=str(record.image_path))
        height, width = image.shape[-2:]
        if record.height is not None and (record.height, record.width) != (height, width):
            raise DataError(
                f"image {record.image_path} is {height}x{width} but its annotation says "
                f"{record.height}x{record.width}"
            )
        target = self._target(record, height, width)
        meta = {
            "file_name": record.file_name,
            "image_id": record.image_id,
            "orig_size": (height, width),
        }
        return image, target, meta

    def _target(self, record: ImageRecord, height: int, width: int) -> dict[str, Any]:
        raise NotImplementedError


def _coco_images(
    data: dict[str, Any], image_dir: Path, skipper: _Skipper, path: Path
) -> tuple[dict[int, dict[str, Any]], set[int]]:
    """(entries of the images whose file exists by id, every image id the JSON lists)."""
    images: dict[int, dict[str, Any]] = {}
    listed: set[int] = set()
    for index, entry in enumerate(require_list(data, "images", path=path)):
        image_id, file_name = _image_entry(entry, path=path, where=f"images[{index}]")
        listed.add(image_id)
        if not (image_dir / file_name).is_file():
            skipper(f"image file not found: {image_dir / file_name} (listed in {path})")
            continue
        images[image_id] = entry
    return images, listed


def _image_entry(entry: Any, *, path: Path, where: str) -> tuple[int, str]:
    """(id, file_name) of a COCO ``images`` entry whose fields all have their JSON types."""
    entry = require_entry(entry, path=path, where=where)
    image_id = require_field(entry, "id", int, path=path, where=where)
    where = f"{where} (id {image_id})"
    file_name = require_field(entry, "file_name", str, path=path, where=where)
    for key in ("height", "width"):
        require_field(entry, key, int, path=path, where=where, optional=True)
    return image_id, file_name


def _instance_annotation(ann: Any, *, path: Path, where: str) -> dict[str, Any]:
    """A COCO instances ``annotations`` entry with an integer image_id and category_id and a
    segmentation that is a polygon list or an RLE object (its content is checked when decoded)."""
    ann = require_entry(ann, path=path, where=where)
    if "id" in ann:
        where = f"{where} (id {ann['id']})"
    require_field(ann, "image_id", int, path=path, where=where)
    require_field(ann, "category_id", int, path=path, where=where)
    segmentation = ann.get("segmentation")
    if segmentation is not None and not isinstance(segmentation, (list, dict)):
        raise DataError(
            f"{path}: {where} field 'segmentation' must be a polygon list or an RLE object, "
            f"found {type(segmentation).__name__} {segmentation!r:.40}"
        )
    return ann


def _panoptic_annotation(ann: Any, *, path: Path, where: str) -> dict[str, Any]:
    """A COCO panoptic ``annotations`` entry: integer image_id, string file_name, and segments_info a
    list of objects with integer id and category_id."""
    ann = require_entry(ann, path=path, where=where)
    image_id = require_field(ann, "image_id", int, path=path, where=where)
    where = f"{where} (image_id {image_id})"
    require_field(ann, "file_name", str, path=path, where=where)
    segments = require_field(ann, "segments_info", list, path=path, where=where)
    for index, segment in enumerate(segments):
        segment_where = f"{where} segments_info[{index}]"
        segment = require_entry(segment, path=path, where=segment_where)
        require_field(segment, "id", int, path=path, where=segment_where)
        require_field(segment, "category_id", int, path=path, where=segment_where)
    return ann


class CocoInstanceReader(Reader):
    """COCO instances JSON (polygons, RLE; ``iscrowd`` kept as the COCO tools do)."""

    def __init__(self, source: DataSource) -> None:
        path = Path(source.annotations)
        data = read_json(path, what="COCO instance annotations")
        require_keys(data, ("images", "annotations", "categories"), path=path, what="COCO instances")
        self.categories = CategoryTable.from_coco(data["categories"], default_isthing=True, file=path)
        skipper = _Skipper(source.skip_invalid, str(path))
        images, listed = _coco_images(data, Path(source.images), skipper, path)
        anns: dict[int, list[dict[str, Any]]] = defaultdict(list)
        bad_images: set[int] = set()
        for index, ann in enumerate(require_list(data, "annotations", path=path)):
            ann = _instance_annotation(ann, path=path, where=f"annotations[{index}]")
            image_id = ann["image_id"]
            if image_id not in listed:
                skipper(
                    f"annotation {ann.get('id')} in {path} has image_id {ann.get('image_id')}, which is "
                    "not in its images list"
                )
                continue
            if image_id not in images:  # its image file is missing: reported above
                continue
            if "segmentation" not in ann:
                skipper(f"annotation {ann.get('id')} in {path} (image {image_id}) has no segmentation")
                bad_images.add(image_id)
                continue
            if ann.get("category_id") not in self.categories:
                skipper(
                    f"category id {ann.get('category_id')} in {path} (annotation {ann.get('id')}) "
                    "is not in its categories list"
                )
                bad_images.add(image_id)
                continue
            anns[image_id].append(ann)
        self.records = [
            ImageRecord(
                image_id,
                str(e["file_name"]),
                Path(source.images) / e["file_name"],
                e.get("height"),
                e.get("width"),
                anns.get(image_id, []),
            )
            for image_id, e in sorted(images.items())
            if image_id not in bad_images
        ]
        self.problems = skipper.problems
        skipper.finish(len(self.records))
        self._path = path

    def _target(self, record: ImageRecord, height: int, width: int) -> dict[str, Any]:
        anns = record.annotation
        if not anns:
            return _empty_target(height, width, record.image_id)
        name = f"{self._path} (image {record.file_name})"
        masks = torch.stack(
            [decode_coco_segmentation(a["segmentation"], height, width, name=name) for a in anns]
        )
        return {
            "labels": torch.tensor([self.categories.to_contiguous(a["category_id"]) for a in anns]),
            "masks": masks,
            "iscrowd": torch.tensor([bool(a.get("iscrowd", 0)) for a in anns]),
            "image_id": record.image_id,
        }


class CocoPanopticReader(Reader):
    """COCO panoptic JSON + RGB-id PNGs; ``isthing`` from the categories decides things/stuff."""

    def __init__(self, source: DataSource) -> None:
        path = Path(source.annotations)
        data = read_json(path, what="COCO panoptic annotations")
        require_keys(data, ("images", "annotations", "categories"), path=path, what="COCO panoptic")
        self.categories = CategoryTable.from_coco(data["categories"], file=path)
        for cat in data["categories"]:  # entries are objects with an id: from_coco checked them
            if "isthing" not in cat:
                raise DataError(f"{path}: panoptic category {cat['id']} lacks 'isthing'")
        skipper = _Skipper(source.skip_invalid, str(path))
        images, listed = _coco_images(data, Path(source.images), skipper, path)
        mask_dir = Path(source.masks)
        self.records = []
        annotated: set[int] = set()
        for index, ann in enumerate(require_list(data, "annotations", path=path)):
            ann = _panoptic_annotation(ann, path=path, where=f"annotations[{index}]")
            image_id = ann["image_id"]
            if image_id not in listed:
                skipper(
                    f"panoptic annotation {ann['file_name']} in {path} has image_id {ann.get('image_id')}, "
                    "which is not in its images list"
                )
                continue
            if image_id in annotated:
                skipper(f"image {image_id} has two annotation entries in {path}")
                self.records = [r for r in self.records if r.image_id != image_id]
                continue
            annotated.add(image_id)
            if image_id not in images:  # its image file is missing: reported above
                continue
            png = mask_dir / ann["file_name"]
            if not png.is_file():
                skipper(f"panoptic PNG not found: {png} (listed in {path})")
                continue
            unknown = [
                s["category_id"] for s in ann["segments_info"] if s["category_id"] not in self.categories
            ]
            if unknown:
                skipper(
                    f"category id {unknown[0]} in {path} (image {image_id}) is not in its categories list"
                )
                continue
            entry = images[image_id]
            self.records.append(
                ImageRecord(
                    image_id,
                    str(entry["file_name"]),
                    Path(source.images) / entry["file_name"],
                    entry.get("height"),
                    entry.get("width"),
                    (png, ann["segments_info"]),
                )
            )
        for image_id in sorted(set(images) - annotated):
            skipper(
                f"image {images[image_id]['file_name']} (id {image_id}) in {path} has no entry in "
                "annotations; COCO panoptic needs one per image (segments_info [] for an image with none)"
            )
        self.records.sort(key=lambda r: r.image_id)
        self.problems = skipper.problems
        skipper.finish(len(self.records))

    def _target(self, record: ImageRecord, height: int, width: int) -> dict[str, Any]:
        png, segments = record.annotation
        ids = decode_panoptic_ids(png, name=str(png))  # (h, w)
        if ids.shape != (height, width):
            raise DataError(f"panoptic PNG {png} is {tuple(ids.shape)}, its image is {(height, width)}")
        json_ids = {int(s["id"]) for s in segments}
        png_ids = set(ids.unique().tolist()) - {0}
        if png_ids != json_ids:
            raise DataError(
                f"panoptic PNG {png} does not match its JSON segments_info: ids only in the PNG "
                f"{sorted(png_ids - json_ids)[:5]}, only in the JSON {sorted(json_ids - png_ids)[:5]}"
            )
        if not segments:
            return _empty_target(height, width, record.image_id)
        seg_ids = torch.tensor([int(s["id"]) for s in segments])
        return {
            "labels": torch.tensor([self.categories.to_contiguous(s["category_id"]) for s in segments]),
            "masks": ids[None] == seg_ids[:, None, None],  # (M, h, w)
            "iscrowd": torch.tensor([bool(s.get("iscrowd", 0)) for s in segments]),
            "image_id": record.image_id,
        }


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class SemanticReader(Reader):
    """Image folder + label PNG folder, paired by file stem; one mask per class present.

    ``reduce_zero_label``: label 0 -> ignore (255), others -1 (ADE20K). Pixels equal to
    ``ignore_index`` get no mask. Categories come from ``categories`` when given (the table the model
    is trained with: pass the train split's to the val split), else from the optional ``annotations``
    JSON (COCO ``categories``, ids = label values after reduction), else from scanning every label map
    of this split; a split scanned alone may lack classes another split has, so give a val split the
    train split's table. Every image needs a label PNG of its stem and every label PNG an image.
    """

    def __init__(self, source: DataSource, categories: CategoryTable | None = None) -> None:
        self.source = source
        image_dir, mask_dir = Path(source.images), Path(source.masks)
        for folder, field in ((image_dir, "images"), (mask_dir, "masks")):
            if not folder.is_dir():
                raise DataError(f"DataSource.{field} folder not found: {folder}")
        skipper = _Skipper(source.skip_invalid, str(mask_dir))
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        self.records = []
        for index, image_path in enumerate(images):
            label = mask_dir / f"{image_path.stem}.png"
            if not label.is_file():
                skipper(f"label map not found: {label} (for image {image_path})")
                continue
            self.records.append(ImageRecord(index, image_path.name, image_path, annotation=label))
        image_stems = {image_path.stem for image_path in images}
        for label in sorted(mask_dir.glob("*.png")):
            if label.stem not in image_stems:
                skipper(
                    f"label map {label} has no image: no {label.stem}.* ({', '.join(IMAGE_SUFFIXES)}) "
                    f"in {image_dir}"
                )
        values: set[int] = set()
        if categories is None and not source.annotations:  # the table comes from the label values
            readable = []
            for record in self.records:
                try:
                    values |= set(self._labels(record.annotation).unique().tolist())
                except DataError as error:
                    skipper(str(error))
                    continue
                readable.append(record)
            self.records = readable
        self.problems = skipper.problems
        skipper.finish(len(self.records))
        if categories is not None:
            if source.annotations:
                listed = CategoryTable(_semantic_categories(Path(source.annotations)))
                _check_same_categories(listed, categories, source.annotations)
            self.categories = categories
        elif source.annotations:
            self.categories = CategoryTable(_semantic_categories(Path(source.annotations)))
        else:
            cats = [Category(v, str(v), False) for v in sorted(values - {source.ignore_index})]
            self.categories = CategoryTable(cats)

    def _labels(self, path: Path) -> torch.Tensor:
        labels = decode_label_png(path, name=str(path))
        if self.source.reduce_zero_label:
            ignore = labels == 0
            labels = labels - 1
            labels[ignore | (labels == 254)] = self.source.ignore_index
        return labels

    def _target(self, record: ImageRecord, height: int, width: int) -> dict[str, Any]:
        labels = self._labels(record.annotation)
        if labels.shape != (height, width):
            raise DataError(
                f"label map {record.annotation} is {tuple(labels.shape)}, image is {(height, width)}"
            )
        values = [v for v in labels.unique().tolist() if v != self.source.ignore_index]
        if not values:
            return _empty_target(height, width, record.image_id)
        contiguous = [self.categories.to_contiguous(v, file=str(record.annotation)) for v in values]
        order = sorted(range(len(values)), key=lambda k: contiguous[k])
        value_t = torch.tensor([values[k] for k in order])
        return {
            "labels": torch.tensor([contiguous[k] for k in order]),
            "masks": labels[None] == value_t[:, None, None],  # (M, h, w)
            "iscrowd": torch.zeros(len(values), dtype=torch.bool),
            "image_id": record.image_id,
        }


def _semantic_categories(path: Path) -> list[Category]:
    data = read_json(path, what="semantic categories")
    require_keys(data, ("categories",), path=path, what="semantic categories")
    table = CategoryTable.from_coco(data["categories"], default_isthing=False, file=path)
    return [dataclasses.replace(c, isthing=False) for c in table.categories]


def _check_same_categories(found: CategoryTable, expected: CategoryTable, file: str) -> None:
    """``DataError`` naming ``file`` when its categories are not ``expected`` (the model's table)."""
    if found == expected:
        return
    found_ids = {c.id for c in found.categories}
    expected_ids = {c.id for c in expected.categories}
    if found_ids != expected_ids:
        difference = (
            f"ids only here {sorted(found_ids - expected_ids)[:10]}, "
            f"only in the model's table {sorted(expected_ids - found_ids)[:10]}"
        )
    else:
        changed = [c.id for c in found.categories if c not in expected.categories]
        difference = f"same ids, but names or isthing differ for ids {changed[:10]}"
    raise DataError(
        f"{file} lists other categories than the table the model uses (the train split's): "
        f"{difference}; give every split the same categories"
    )


def open_reader(source: DataSource, *, categories: CategoryTable | None = None) -> Reader:
    """The reader for ``source.format`` (parquet lives in ``knet.data.parquet``).

    ``categories``: the table the model uses (e.g. the train split's when opening val). A semantic
    split without a categories JSON adopts it; any other split must list exactly these categories.
    """
    if source.format == "semantic":
        return SemanticReader(source, categories)
    if source.format == "coco_instance":
        reader: Reader = CocoInstanceReader(source)
    elif source.format == "coco_panoptic":
        reader = CocoPanopticReader(source)
    else:
        from knet.data.parquet import ParquetReader

        reader = ParquetReader(source)
    if categories is not None:
        _check_same_categories(
            reader.categories, categories, source.annotations or f"{source.shards}/manifest.json"
        )
    return reader

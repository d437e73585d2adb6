"""``knet data check``: find a dataset's format from a folder, read every image, report problems."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import fsspec

from knet.data.config import DataSource
from knet.data.errors import DataError
from knet.data.io import require_entry, require_field, require_list
from knet.data.parquet import MANIFEST, ParquetReader
from knet.data.readers import open_reader
from knet.data.shard_store import shard_layout

_MAX_DEPTH = 3


def _dirs(base: Path, depth: int = _MAX_DEPTH) -> list[Path]:
    """``base`` and its sub-folders down to ``depth`` levels (breadth first, sorted)."""
    out, frontier = [base], [base]
    for _ in range(depth):
        frontier = sorted(d for f in frontier for d in f.iterdir() if d.is_dir())
        out += frontier
    return out


def _find_dir(bases: list[Path], file_name: str, exclude: Path | None = None) -> Path | None:
    """The folder holding ``file_name``: one with "image" in its path first; never a panoptic PNG
    folder (a folder ``X`` next to ``X.json``)."""
    found = []
    for base in bases:
        for folder in _dirs(base):
            if folder == exclude or (folder.parent / f"{folder.name}.json").is_file():
                continue
            if (folder / file_name).is_file():
                found.append(folder)
    found.sort(key=lambda d: "image" not in str(d).lower())  # stable: keeps breadth-first order
    return found[0] if found else None


def _coco_source(json_path: Path) -> DataSource:
    try:
        data = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{json_path} is not readable JSON: {error}") from None
    if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
        raise DataError(f"{json_path} is not a COCO JSON (needs images, annotations, categories)")
    images_list = require_list(data, "images", path=json_path)
    annotations = require_list(data, "annotations", path=json_path)
    if not images_list:
        raise DataError(f"{json_path} lists no images: the dataset is empty")
    first_image = require_field(
        require_entry(images_list[0], path=json_path, where="images[0]"),
        "file_name",
        str,
        path=json_path,
        where="images[0]",
    )
    bases = [json_path.parent, json_path.parent.parent]
    panoptic = bool(annotations) and isinstance(annotations[0], dict) and "segments_info" in annotations[0]
    masks = None
    if panoptic:
        first_png = require_field(annotations[0], "file_name", str, path=json_path, where="annotations[0]")
        masks = json_path.parent / json_path.stem
        if not (masks / first_png).is_file():
            masks = _find_dir(bases, first_png)
        if masks is None:
            raise DataError(f"{json_path}: cannot find the folder holding its panoptic PNG {first_png}")
    images = _find_dir(bases, first_image, exclude=masks)
    if images is None:
        raise DataError(
            f"{json_path}: cannot find the folder holding its image {first_image} "
            f"within {_MAX_DEPTH} levels of {bases[-1]}"
        )
    if panoptic:
        return DataSource("coco_panoptic", images=str(images), annotations=str(json_path), masks=str(masks))
    return DataSource("coco_instance", images=str(images), annotations=str(json_path))


def detect_source(path: str) -> DataSource:
    """A DataSource for ``path``: a Parquet folder/URI (has manifest.json), a COCO JSON file, a
    folder holding exactly one COCO JSON (top level or ``annotations/``), a semantic folder with
    ``images/`` and ``annotations/`` (or ``labels/`` / ``masks/``) sub-folders of matching stems, or a
    semantic label folder ``<root>/<labels>/<split>`` beside ``<root>/images/<split>``."""
    fs, root = fsspec.core.url_to_fs(str(path))
    if fs.exists(f"{root.rstrip('/')}/{MANIFEST}"):
        return DataSource("parquet", shards=str(path))
    local = Path(path)
    if local.is_file() and local.suffix == ".json":
        return _coco_source(local)
    if not local.is_dir():
        raise DataError(f"dataset path not found: {path}")
    jsons = sorted([*local.glob("*.json"), *local.glob("annotations/*.json")])
    jsons = [j for j in jsons if j.name not in ("synthetic.json", "categories.json")]
    if len(jsons) == 1:
        return _coco_source(jsons[0])
    if len(jsons) > 1:
        raise DataError(
            f"{path} holds several annotation JSONs ({', '.join(j.name for j in jsons)}): "
            "pass the JSON file itself"
        )
    images = local / "images"
    for name in ("annotations", "labels", "masks"):
        labels = local / name
        if images.is_dir() and labels.is_dir():
            return _semantic_source(images, labels, local / "categories.json")
    # a label folder <root>/<labels>/<split> beside <root>/images/<split> (ADE20K's
    # annotations/training, the generator's semantic/train); categories.json sits in <labels>/
    images = local.parent.parent / "images" / local.name
    if images.is_dir() and images != local and any(local.glob("*.png")):
        return _semantic_source(images, local, local.parent / "categories.json")
    raise DataError(
        f"cannot tell the dataset format of {path}: expected manifest.json (parquet), a COCO JSON, "
        "images/ + annotations/ folders, or a label PNG folder X/<split> beside images/<split> (semantic)"
    )


def _semantic_source(images: Path, labels: Path, categories: Path) -> DataSource:
    """A semantic DataSource; ``reduce_zero_label`` is taken from the categories JSON's optional
    ``reduce_zero_label`` key (False without one), never guessed from the label values."""
    reduce_zero_label = False
    if categories.is_file():
        try:
            reduce_zero_label = json.loads(categories.read_text()).get("reduce_zero_label", False) is True
        except (OSError, json.JSONDecodeError, AttributeError) as error:
            raise DataError(f"{categories} is not a readable categories JSON: {error}") from None
    return DataSource(
        "semantic",
        images=str(images),
        masks=str(labels),
        annotations=str(categories) if categories.is_file() else None,
        reduce_zero_label=reduce_zero_label,
    )


@dataclass
class DatasetReport:
    """Result of ``check_dataset``: counts and every problem found (``ok`` when there are none)."""

    source: DataSource
    num_images: int = 0
    num_thing_classes: int = 0
    num_stuff_classes: int = 0
    segments_per_class: dict[str, int] = field(default_factory=dict)
    crowd_segments: int = 0
    problems: list[str] = field(default_factory=list)
    storage: list[str] = field(default_factory=list)  # Parquet: shard and row-group sizes

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        lines = [
            f"dataset: {self.source.format} ({self.source.annotations or self.source.shards or self.source.masks})",
            *self.storage,
            f"images: {self.num_images}",
            f"classes: {self.num_thing_classes} things + {self.num_stuff_classes} stuff",
            f"crowd segments: {self.crowd_segments}",
            "segments per class:",
            *(f"  {name}: {count}" for name, count in self.segments_per_class.items()),
            f"problems: {len(self.problems)}",
            *(f"  - {p}" for p in self.problems[:20]),
            "OK" if self.ok else "NOT OK",
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def check_dataset(src: DataSource | str) -> DatasetReport:
    """Open ``src`` (a DataSource or a path for ``detect_source``) and decode every image."""
    source = detect_source(src) if isinstance(src, str) else src
    report = DatasetReport(source)
    try:
        reader = open_reader(dataclasses.replace(source, skip_invalid=True))
    except DataError as error:
        report.problems.append(str(error))
        return report
    report.problems += reader.problems
    if isinstance(reader, ParquetReader):
        try:
            report.storage = shard_layout(reader.store).lines()
        except DataError as error:
            report.problems.append(str(error))
    table = reader.categories
    report.num_thing_classes, report.num_stuff_classes = table.num_thing_classes, table.num_stuff_classes
    counts: Counter[int] = Counter()
    for index in range(len(reader)):
        try:
            _, target, _ = reader.read(index)
        except DataError as error:
            if str(error) not in report.problems[-1:]:  # a corrupted Parquet shard: once, not per row
                report.problems.append(str(error))
            continue
        report.num_images += 1
        counts.update(target["labels"].tolist())
        report.crowd_segments += int(target["iscrowd"].sum())
    report.segments_per_class = {name: counts[k] for k, name in enumerate(table.names)}
    return report


__all__ = ["DatasetReport", "check_dataset", "detect_source"]

"""Parquet packing: shards of (encoded image, RLE masks, dataset category ids) + a checksummed manifest.

Layout under ``out`` (a local path or any fsspec URI, e.g. ``s3://...``, ``memory://...``)::

    manifest.json               categories; per shard: file name, row count, sha256, bytes, rows per row group
    shard-00000.parquet ...     columns below; schema metadata repeats the categories

Shards and their row groups are sized in bytes (``target_mb``, ``row_group_mb``), so a reader can
fetch one row group of a few MB instead of a whole shard (``knet.data.shard_store``). A shard's
sha256 is checked once per process before its rows are used (see ``knet.data.shard_store``), so a
corrupted or truncated shard fails with a ``DataError`` naming it instead of yielding wrong pixels.
Manifests written before ``num_bytes``/``row_groups`` existed still load (row groups then come from
the shard's footer).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pycocotools import mask as mask_utils

from knet.data.categories import CategoryTable
from knet.data.config import DataSource
from knet.data.errors import DataError
from knet.data.io import decode_rgb, require_entry, require_field, require_list
from knet.data.readers import Reader, Sample, open_reader
from knet.data.shard_store import ShardStore
from knet.errors import KnetInputError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_TAG = "knet-parquet/1"
SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("file_name", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("image", pa.binary()),  # the original encoded file bytes (PNG/JPEG)
        ("category_ids", pa.list_(pa.int64())),  # dataset ids, one per segment
        ("iscrowd", pa.list_(pa.bool_())),
        ("masks_rle", pa.list_(pa.binary())),  # COCO compressed RLE counts, one per segment
    ]
)


# Packing defaults: shards of ~128 MB (few enough objects on S3, small enough to pack in memory) in
# row groups of ~8 MB (one random read per sample stays small).
TARGET_MB = 128.0
ROW_GROUP_MB = 8.0


@dataclass
class ShardInfo:
    path: str  # relative to the manifest's folder
    num_rows: int
    sha256: str
    num_bytes: int | None = None  # file size; None in manifests written before it was recorded
    row_groups: list[int] | None = None  # rows per row group; None likewise (read from the footer)


@dataclass
class Manifest:
    """What ``pack_dataset`` wrote: categories (contiguous order) and the shards.

    reduce_zero_label: the source was a semantic dataset read with ADE20K's rule (its label ids are one
    above the category ids); kept so predictions can be written back in the source's label ids.
    """

    root: str
    categories: list[dict[str, Any]]
    shards: list[ShardInfo] = field(default_factory=list)
    format: str = FORMAT_TAG
    reduce_zero_label: bool = False

    @property
    def num_images(self) -> int:
        return sum(s.num_rows for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("root")
        data["num_images"] = self.num_images
        return data


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def _encode_masks(masks: torch.Tensor) -> list[bytes]:
    if masks.shape[0] == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))  # (h, w, M)
    return [r["counts"] for r in rles]


def _image_bytes(reader: Reader, index: int) -> bytes:
    if isinstance(reader, ParquetReader):
        return reader.image_bytes(index)
    path = reader.records[index].image_path
    return path.read_bytes()


class _ShardWriter:
    """Appends rows to shards under ``root``: a row group closes once its payload (encoded image and
    mask bytes) reaches ``row_group_bytes``, a shard once it reaches ``target_bytes`` or ``max_rows``.
    A shard is built in memory (at most about ``target_bytes``) so its sha256 is known when written."""

    def __init__(
        self,
        fs: Any,
        root: str,
        manifest: Manifest,
        target_bytes: int,
        row_group_bytes: int,
        max_rows: int | None,
    ) -> None:
        self.fs, self.root, self.manifest = fs, root, manifest
        self.target_bytes, self.row_group_bytes, self.max_rows = target_bytes, row_group_bytes, max_rows
        self.metadata = {"knet.categories": json.dumps(manifest.categories)}
        self.group: list[dict[str, Any]] = []
        self.group_bytes = 0
        self.shard_bytes = 0
        self.row_groups: list[int] = []
        self.sink: pa.BufferOutputStream | None = None
        self.writer: pq.ParquetWriter | None = None

    def add(self, row: dict[str, Any]) -> None:
        payload = len(row["image"]) + sum(len(c) for c in row["masks_rle"]) + 64
        self.group.append(row)
        self.group_bytes += payload
        self.shard_bytes += payload
        shard_rows = sum(self.row_groups) + len(self.group)
        shard_full = self.shard_bytes >= self.target_bytes or shard_rows == self.max_rows
        if self.group_bytes >= self.row_group_bytes or shard_full:
            self._write_group()
        if shard_full:
            self.finish_shard()

    def _write_group(self) -> None:
        if self.writer is None:
            self.sink = pa.BufferOutputStream()
            self.writer = pq.ParquetWriter(self.sink, SCHEMA.with_metadata(self.metadata))
        self.writer.write_table(
            pa.Table.from_pylist(self.group, schema=SCHEMA), row_group_size=len(self.group)
        )
        self.row_groups.append(len(self.group))
        self.group, self.group_bytes = [], 0

    def finish_shard(self) -> None:
        """Write the open shard (if any rows) and record it in the manifest."""
        if self.group:
            self._write_group()
        if self.writer is None or self.sink is None:
            return
        self.writer.close()
        data = self.sink.getvalue().to_pybytes()
        name = f"shard-{len(self.manifest.shards):05d}.parquet"
        with self.fs.open(_join(self.root, name), "wb") as handle:
            handle.write(data)
        digest = hashlib.sha256(data).hexdigest()
        self.manifest.shards.append(ShardInfo(name, sum(self.row_groups), digest, len(data), self.row_groups))
        self.writer, self.sink, self.row_groups, self.shard_bytes = None, None, [], 0


def _row(reader: Reader, index: int, table: CategoryTable) -> dict[str, Any]:
    """Item ``index`` of ``reader`` as a shard row (``DataError`` when it cannot be decoded)."""
    image, target, meta = reader.read(index)
    return {
        "image_id": int(meta["image_id"]),
        "file_name": meta["file_name"],
        "height": int(image.shape[1]),
        "width": int(image.shape[2]),
        "image": _image_bytes(reader, index),
        "category_ids": [table.to_dataset_id(int(k)) for k in target["labels"]],
        "iscrowd": [bool(c) for c in target.get("iscrowd", torch.zeros(len(target["labels"])))],
        "masks_rle": _encode_masks(target["masks"]),
    }


def _check_sizes(shard_size: int | None, target_mb: float, row_group_mb: float) -> None:
    if shard_size is not None and shard_size < 1:
        raise KnetInputError(f"shard_size={shard_size} must be >= 1")
    if not (target_mb > 0 and row_group_mb > 0):
        raise KnetInputError(f"target_mb={target_mb} and row_group_mb={row_group_mb} must be > 0")


def pack_dataset(
    src: DataSource,
    out: str,
    shard_size: int | None = None,
    *,
    target_mb: float = TARGET_MB,
    row_group_mb: float = ROW_GROUP_MB,
) -> Manifest:
    """Pack every image of ``src`` into Parquet shards under ``out`` (sizes: see ``write_shards``).

    With ``src.skip_invalid`` an image that fails to decode is left out with a warning (and a count at
    the end); otherwise its ``DataError`` stops the packing.
    """
    _check_sizes(shard_size, target_mb, row_group_mb)  # before reading anything
    reader = open_reader(src)
    table = reader.categories
    manifest = Manifest(root=str(out), categories=table.to_dict(), reduce_zero_label=src.reduce_zero_label)
    skipped: list[str] = []

    def rows() -> Iterator[dict[str, Any]]:
        for index in range(len(reader)):
            try:
                row = _row(reader, index, table)
            except DataError as error:
                if not src.skip_invalid:
                    raise
                skipped.append(str(error))
                log.warning("skip_invalid=True: not packing unreadable item %d: %s", index, error)
                continue
            yield row
        if len(skipped) == len(reader):
            raise DataError(f"none of the {len(reader)} images of {src.annotations or src.masks} can be read")

    write_shards(rows(), manifest, shard_size, target_mb=target_mb, row_group_mb=row_group_mb)
    if skipped:
        log.warning(
            "skip_invalid=True: packed %d image(s), left out %d unreadable one(s), first: %s",
            manifest.num_images,
            len(skipped),
            skipped[0],
        )
    return manifest


def write_shards(
    rows: Iterable[dict[str, Any]],
    manifest: Manifest,
    shard_size: int | None = None,
    *,
    target_mb: float = TARGET_MB,
    row_group_mb: float = ROW_GROUP_MB,
) -> Manifest:
    """Write ``rows`` (dicts of the SCHEMA columns) as shards of about ``target_mb`` MB under
    ``manifest.root``, each in row groups of about ``row_group_mb`` MB, then ``manifest.json``. Sizes
    count the encoded image and mask bytes; a row is never split, so a group holds at least one row.
    ``shard_size``: also close a shard at that many rows. Re-packing existing shards in another layout
    needs no decoding: ``write_shards((row for _, row in iter_rows(store)), ...)``."""
    _check_sizes(shard_size, target_mb, row_group_mb)
    fs, root = fsspec.core.url_to_fs(manifest.root)
    fs.makedirs(root, exist_ok=True)
    writer = _ShardWriter(fs, root, manifest, int(target_mb * 2**20), int(row_group_mb * 2**20), shard_size)
    for row in rows:
        writer.add(row)
    writer.finish_shard()
    if not manifest.shards:
        raise DataError(f"no rows to write to {manifest.root}")
    with fs.open(_join(root, MANIFEST), "w") as handle:
        json.dump(manifest.to_dict(), handle, indent=1)
    return manifest


def load_manifest(uri: str) -> Manifest:
    """Read ``<uri>/manifest.json``; ``DataError`` naming it when missing or malformed."""
    fs, root = fsspec.core.url_to_fs(str(uri))
    path = _join(root, MANIFEST)
    try:
        with fs.open(path, "r") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise DataError(f"Parquet manifest not found: {_join(str(uri), MANIFEST)}") from None
    except json.JSONDecodeError as error:
        raise DataError(f"Parquet manifest {_join(str(uri), MANIFEST)} is not JSON: {error}") from None
    if (
        not isinstance(data, dict)
        or data.get("format") != FORMAT_TAG
        or not {"shards", "categories"} <= set(data)
    ):
        raise DataError(
            f"{_join(str(uri), MANIFEST)} is not a knet Parquet manifest (format {FORMAT_TAG!r} "
            "with categories and shards); write one with knet.data.pack_dataset"
        )
    manifest = _join(str(uri), MANIFEST)
    shards = [
        _shard_info(entry, path=manifest, where=f"shards[{index}]")
        for index, entry in enumerate(require_list(data, "shards", path=manifest))
    ]
    CategoryTable.from_coco(data["categories"], file=manifest)  # a malformed entry is named here
    return Manifest(
        str(uri),
        data["categories"],
        shards,
        data["format"],
        reduce_zero_label=bool(data.get("reduce_zero_label", False)),  # absent in older manifests
    )


def _shard_info(entry: Any, *, path: str, where: str) -> ShardInfo:
    """A manifest ``shards`` entry whose fields have their types; ``DataError`` naming the field.
    ``num_bytes`` and ``row_groups`` are optional (manifests written before them lack them)."""
    entry = require_entry(entry, path=path, where=where)
    num_rows = require_field(entry, "num_rows", int, path=path, where=where)
    row_groups = require_field(entry, "row_groups", list, path=path, where=where, optional=True)
    if row_groups is not None and (
        not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in row_groups)
        or sum(row_groups) != num_rows
    ):
        raise DataError(
            f"{path}: {where}.row_groups must be positive row counts summing to num_rows={num_rows}"
        )
    return ShardInfo(
        require_field(entry, "path", str, path=path, where=where),
        num_rows,
        require_field(entry, "sha256", str, path=path, where=where),
        require_field(entry, "num_bytes", int, path=path, where=where, optional=True),
        row_groups,
    )


def decode_row(row: dict[str, Any], categories: CategoryTable, name: str) -> Sample:
    """One shard row (a dict of the SCHEMA columns) -> (uint8 image (3, h, w), target, meta);
    ``name`` locates the row in errors. Shared by ``ParquetReader`` and streaming consumers."""
    image = decode_rgb(row["image"], name=name)
    h, w = row["height"], row["width"]
    if tuple(image.shape[-2:]) != (h, w):
        raise DataError(f"{name}: image is {tuple(image.shape[-2:])}, row says {(h, w)}")
    rles = [{"size": [h, w], "counts": c} for c in row["masks_rle"]]
    if rles:
        masks = torch.from_numpy(mask_utils.decode(rles).astype(bool))  # (h, w, M)
        masks = masks.permute(2, 0, 1)  # (M, h, w)
    else:
        masks = torch.zeros(0, h, w, dtype=torch.bool)
    image_id = int(row["image_id"])
    target = {
        "labels": torch.tensor(
            [categories.to_contiguous(c, file=name) for c in row["category_ids"]], dtype=torch.int64
        ),
        "masks": masks.contiguous(),
        "iscrowd": torch.tensor(row["iscrowd"], dtype=torch.bool),
        "image_id": image_id,
    }
    meta = {"file_name": row["file_name"], "image_id": image_id, "orig_size": (h, w)}
    return image, target, meta


class ParquetReader(Reader):
    """Random access to what ``pack_dataset`` wrote: row ``i`` reads only its row group (the last one
    read is kept, so storage order reads each group once). Shards are checked as ``ShardStore`` says.
    The reader holds row offsets per shard and row group, never a per-row index."""

    def __init__(self, source: DataSource) -> None:
        self.manifest = load_manifest(source.shards)
        self.categories = CategoryTable.from_dict(self.manifest.categories)
        self.store = ShardStore(str(source.shards), self.manifest.shards)
        for k in range(len(self.manifest.shards)):
            if not self.store.exists(k):
                raise DataError(f"Parquet shard not found: {self.store.name(k)}")
        if len(self.store) == 0:
            raise DataError(f"{_join(str(source.shards), MANIFEST)}: the dataset is empty (no rows)")
        self.records = []  # rows live in the shards; len() comes from the store
        self.problems = []
        self._cache: tuple[int, int, pa.Table] | None = None

    def __len__(self) -> int:
        return len(self.store)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}

    def row(self, index: int) -> tuple[str, dict[str, Any]]:
        """(shard name + row, the row's columns) of dataset row ``index``."""
        k, g, r = self.store.locate(index)
        if self._cache is None or self._cache[:2] != (k, g):
            self._cache = (k, g, self.store.read_row_group(k, g))
        row = self._cache[2].slice(r, 1).to_pylist()[0]
        local = index - self.store.shard_start(k)
        return f"{self.store.name(k)} row {local} ({row['file_name']})", row

    def image_bytes(self, index: int) -> bytes:
        return self.row(index)[1]["image"]

    def read(self, index: int) -> Sample:
        name, row = self.row(index)
        return decode_row(row, self.categories, name)

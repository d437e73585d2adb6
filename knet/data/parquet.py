"""Parquet packing: shards of (encoded image, RLE masks, dataset category ids) + a checksummed manifest.

Layout under ``out`` (a local path or any fsspec URI, e.g. ``s3://...``, ``memory://...``)::

    manifest.json               categories, per-shard file name, row count and sha256
    shard-00000.parquet ...     columns below; schema metadata repeats the categories

A shard's sha256 is checked every time it is loaded, so a corrupted or truncated shard fails
with a ``DataError`` naming it instead of yielding wrong pixels.
"""

from __future__ import annotations

import hashlib
import json
import logging
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


@dataclass
class ShardInfo:
    path: str  # relative to the manifest's folder
    num_rows: int
    sha256: str


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


def pack_dataset(src: DataSource, out: str, shard_size: int = 256) -> Manifest:
    """Pack every image of ``src`` into Parquet shards of ``shard_size`` rows under ``out``.

    With ``src.skip_invalid`` an image that fails to decode is left out with a warning (and a count at
    the end); otherwise its ``DataError`` stops the packing.
    """
    if shard_size < 1:
        raise KnetInputError(f"shard_size={shard_size} must be >= 1")
    reader = open_reader(src)
    table = reader.categories
    manifest = Manifest(root=str(out), categories=table.to_dict(), reduce_zero_label=src.reduce_zero_label)
    fs, root = fsspec.core.url_to_fs(str(out))
    fs.makedirs(root, exist_ok=True)
    rows: list[dict[str, Any]] = []

    def flush() -> None:
        name = f"shard-{len(manifest.shards):05d}.parquet"
        sink = pa.BufferOutputStream()
        batch = pa.Table.from_pylist(rows, schema=SCHEMA).replace_schema_metadata(
            {"knet.categories": json.dumps(table.to_dict())}
        )
        pq.write_table(batch, sink)
        data = sink.getvalue().to_pybytes()
        with fs.open(_join(root, name), "wb") as handle:
            handle.write(data)
        manifest.shards.append(ShardInfo(name, len(rows), hashlib.sha256(data).hexdigest()))
        rows.clear()

    skipped: list[str] = []
    for index in range(len(reader)):
        try:
            image, target, meta = reader.read(index)
        except DataError as error:
            if not src.skip_invalid:
                raise
            skipped.append(str(error))
            log.warning("skip_invalid=True: not packing unreadable item %d: %s", index, error)
            continue
        rows.append(
            {
                "image_id": int(meta["image_id"]),
                "file_name": meta["file_name"],
                "height": int(image.shape[1]),
                "width": int(image.shape[2]),
                "image": _image_bytes(reader, index),
                "category_ids": [table.to_dataset_id(int(k)) for k in target["labels"]],
                "iscrowd": [bool(c) for c in target.get("iscrowd", torch.zeros(len(target["labels"])))],
                "masks_rle": _encode_masks(target["masks"]),
            }
        )
        if len(rows) == shard_size:
            flush()
    if rows:
        flush()
    if skipped:
        log.warning(
            "skip_invalid=True: packed %d image(s), left out %d unreadable one(s), first: %s",
            manifest.num_images,
            len(skipped),
            skipped[0],
        )
    if not manifest.shards:
        raise DataError(f"none of the {len(reader)} images of {src.annotations or src.masks} can be read")
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
    """A manifest ``shards`` entry whose fields have their types; ``DataError`` naming the field."""
    entry = require_entry(entry, path=path, where=where)
    return ShardInfo(
        require_field(entry, "path", str, path=path, where=where),
        require_field(entry, "num_rows", int, path=path, where=where),
        require_field(entry, "sha256", str, path=path, where=where),
    )


class ParquetReader(Reader):
    """Reads what ``pack_dataset`` wrote; verifies each shard's sha256 when it is loaded."""

    def __init__(self, source: DataSource) -> None:
        self.manifest = load_manifest(source.shards)
        self.categories = CategoryTable.from_dict(self.manifest.categories)
        self._fs, self._root = fsspec.core.url_to_fs(str(source.shards))
        for shard in self.manifest.shards:
            if not self._fs.exists(_join(self._root, shard.path)):
                raise DataError(f"Parquet shard not found: {_join(str(source.shards), shard.path)}")
        self._index = [(k, row) for k, s in enumerate(self.manifest.shards) for row in range(s.num_rows)]
        if not self._index:
            raise DataError(f"{_join(str(source.shards), MANIFEST)}: the dataset is empty (no rows)")
        self.records = []  # rows live in the shards; len() comes from the index
        self.problems = []
        self._cache: tuple[int, dict[str, list[Any]]] | None = None

    def __len__(self) -> int:
        return len(self._index)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}

    def _shard(self, k: int) -> dict[str, list[Any]]:
        if self._cache is not None and self._cache[0] == k:
            return self._cache[1]
        shard = self.manifest.shards[k]
        name = _join(self.manifest.root, shard.path)
        with self._fs.open(_join(self._root, shard.path), "rb") as handle:
            data = handle.read()
        digest = hashlib.sha256(data).hexdigest()
        if digest != shard.sha256:
            raise DataError(
                f"checksum mismatch for Parquet shard {name}: sha256 {digest[:12]}... but the "
                f"manifest says {shard.sha256[:12]}... (corrupted or rewritten; re-pack the dataset)"
            )
        table = pq.read_table(pa.BufferReader(data)).to_pydict()
        if len(table["image_id"]) != shard.num_rows:
            raise DataError(
                f"Parquet shard {name} has {len(table['image_id'])} rows, manifest says {shard.num_rows}"
            )
        self._cache = (k, table)
        return table

    def image_bytes(self, index: int) -> bytes:
        k, row = self._index[index]
        return self._shard(k)["image"][row]

    def read(self, index: int) -> Sample:
        k, row = self._index[index]
        cols = self._shard(k)
        name = (
            f"{_join(self.manifest.root, self.manifest.shards[k].path)} row {row} ({cols['file_name'][row]})"
        )
        image = decode_rgb(cols["image"][row], name=name)
        h, w = cols["height"][row], cols["width"][row]
        if tuple(image.shape[-2:]) != (h, w):
            raise DataError(f"{name}: image is {tuple(image.shape[-2:])}, row says {(h, w)}")
        rles = [{"size": [h, w], "counts": c} for c in cols["masks_rle"][row]]
        if rles:
            masks = torch.from_numpy(mask_utils.decode(rles).astype(bool)).permute(
                2, 0, 1
            )  # (h, w, M) -> (M, h, w)
        else:
            masks = torch.zeros(0, h, w, dtype=torch.bool)
        image_id = int(cols["image_id"][row])
        target = {
            "labels": torch.tensor(
                [self.categories.to_contiguous(c, file=name) for c in cols["category_ids"][row]],
                dtype=torch.int64,
            ),
            "masks": masks.contiguous(),
            "iscrowd": torch.tensor(cols["iscrowd"][row], dtype=torch.bool),
            "image_id": image_id,
        }
        meta = {"file_name": cols["file_name"][row], "image_id": image_id, "orig_size": (h, w)}
        return image, target, meta

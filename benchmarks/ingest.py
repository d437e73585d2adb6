"""Parquet ingest for one training worker: rows/s in shuffled and sequential order, the reader before
row groups against the row-group path, for shards of 64 and 256 rows of 512x512 synthetic images.

    python -m benchmarks.ingest [--images 40] [--rows 1024] [--size 512] [--old-sample 48]
        [--buffer 256] [--repeats 3] [--json figures.json]

Synthesizes ``--images`` scenes (``knet data synth``'s generator), packs their train split with
``knet.data.pack_dataset``, then writes ``--rows`` rows cycling over those (same bytes, new image ids;
decoding and re-encoding 1024 images would take minutes) with ``knet.data.parquet.write_shards`` in two
layouts: ``shard_size`` 64 and 256 (``target_mb`` high enough for the row cap to decide), row groups at
the 8 MB default. Per layout it times, with no decode (rows as the
reader hands them over; decode costs the same on every path and is timed once, separately):

- old: ``ParquetReader._shard`` as it was before row groups (``whole_shard_per_index`` below): a row
  reads, hashes and ``to_pydict()``s its whole shard, one shard cached. Shuffled order is timed on the
  first ``--old-sample`` indices of a seeded permutation (it is slow), sequential order on every row.
- new, streaming: ``knet.data.shard_store.iter_rows`` over every row, sequential (``seed=None``) and
  shuffled (seeded block order + a ``--buffer``-row shuffle buffer): the path for training; median
  of ``--repeats`` passes.
- new, random access: ``ParquetReader.row(i)`` (one row group per access) in shuffled order, on the
  same sample as the old reader.

Every new-path pass starts as a fresh process would (``clear_verified``): each shard is hashed once in
it. The files were just written, so they are read from the page cache: this measures the reader's own
cost, not a disk or S3. ``shuffled_over_sequential`` in ``--json`` is the new streaming path's
shuffled per-row cost over its sequential per-row cost, the larger of the two layouts (goal <= 1.2).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from knet.data import DataSource, pack_dataset, synthesize
from knet.data.categories import CategoryTable
from knet.data.parquet import Manifest, ParquetReader, decode_row, load_manifest, write_shards
from knet.data.shard_store import clear_verified, iter_rows


def whole_shard_per_index(uri: str) -> Callable[[int], dict[str, Any]]:
    """The per-index reader before row groups: row ``i`` loads its whole shard (read, sha256,
    ``to_pydict``), and only the last shard is kept. Returns ``row(i) -> the row's columns``."""
    manifest = load_manifest(uri)
    fs, root = fsspec.core.url_to_fs(uri)
    index = [(k, row) for k, s in enumerate(manifest.shards) for row in range(s.num_rows)]
    cache: dict[int, dict[str, list[Any]]] = {}

    def row(i: int) -> dict[str, Any]:
        k, r = index[i]
        if k not in cache:
            with fs.open(f"{root}/{manifest.shards[k].path}", "rb") as handle:
                data = handle.read()
            if hashlib.sha256(data).hexdigest() != manifest.shards[k].sha256:
                raise RuntimeError(f"checksum mismatch for {manifest.shards[k].path}")
            cache.clear()
            cache[k] = pq.read_table(pa.BufferReader(data)).to_pydict()
        return {name: column[r] for name, column in cache[k].items()}

    return row


def rows_per_second(rows: Iterable[Any]) -> float:
    """Consume ``rows``; their count over the seconds it took."""
    start, count = time.perf_counter(), 0
    for _ in rows:
        count += 1
    return count / (time.perf_counter() - start)


def replicated_rows(uri: str, rows: int) -> Iterator[dict[str, Any]]:
    """``rows`` shard rows cycling over the rows packed under ``uri``, each with its own image id."""
    packed = [row for _, row in iter_rows(ParquetReader(DataSource("parquet", shards=uri)).store)]
    for n in range(rows):
        yield {**packed[n % len(packed)], "image_id": n + 1, "file_name": f"{n:06d}.png"}


def first_epoch_rate(rows: Callable[[], Iterable[Any]], repeats: int) -> float:
    """Median rows/s of ``repeats`` passes, each as a fresh process's first epoch (shards hashed)."""
    rates = []
    for _ in range(repeats):
        clear_verified()
        rates.append(rows_per_second(rows()))
    return statistics.median(rates)


def measure_layout(uri: str, old_sample: int, buffer_rows: int, seed: int, repeats: int) -> dict[str, float]:
    """Rows/s of the old and the new reader on the shards under ``uri``, shuffled and sequential."""
    reader = ParquetReader(DataSource("parquet", shards=uri))
    order = list(range(len(reader)))
    random.Random(seed).shuffle(order)
    sample = order[:old_sample]
    old_row = whole_shard_per_index(uri)
    figures = {"old_shuffled": rows_per_second(old_row(i) for i in sample)}
    old_row = whole_shard_per_index(uri)
    figures["old_sequential"] = rows_per_second(old_row(i) for i in range(len(reader)))
    figures["new_sequential"] = first_epoch_rate(lambda: iter_rows(reader.store), repeats)
    figures["new_shuffled"] = first_epoch_rate(
        lambda: iter_rows(reader.store, seed=seed, buffer_rows=buffer_rows), repeats
    )
    clear_verified()
    fresh = ParquetReader(DataSource("parquet", shards=uri))
    figures["new_random_access_shuffled"] = rows_per_second(fresh.row(i) for i in sample)
    figures["shuffled_over_sequential"] = figures["new_sequential"] / figures["new_shuffled"]
    figures["old_shuffled_over_sequential"] = figures["old_sequential"] / figures["old_shuffled"]
    figures["new_over_old_shuffled"] = figures["new_shuffled"] / figures["old_shuffled"]
    return figures


def decode_rate(uri: str, rows: int) -> float:
    """Rows/s of ``decode_row`` (PNG + RLE masks to tensors) in one process, for scale."""
    reader = ParquetReader(DataSource("parquet", shards=uri))
    table = CategoryTable.from_dict(reader.manifest.categories)
    loaded = [reader.row(i) for i in range(rows)]
    return rows_per_second(decode_row(row, table, name) for name, row in loaded)


def layout_figures(packed: Manifest, uri: str, shard_rows: int, args: argparse.Namespace) -> dict[str, float]:
    """Write ``args.rows`` rows under ``uri`` in ``shard_rows``-row shards, time them, print the lines."""
    start = time.perf_counter()
    manifest = Manifest(uri, packed.categories)
    write_shards(replicated_rows(packed.root, args.rows), manifest, shard_rows, target_mb=4096)
    groups = len(manifest.shards[0].row_groups or [])
    mb = sum(s.num_bytes or 0 for s in manifest.shards) / len(manifest.shards) / 2**20
    print(
        f"\n{shard_rows}-row shards: {len(manifest.shards)} of {mb:.0f} MB, {groups} row groups each "
        f"(written in {time.perf_counter() - start:.0f} s)"
    )
    result = measure_layout(uri, args.old_sample, args.buffer, args.seed, args.repeats)
    result.update(shard_mb=mb, row_groups_per_shard=groups)
    for key in (
        "old_sequential",
        "old_shuffled",
        "new_sequential",
        "new_shuffled",
        "new_random_access_shuffled",
    ):
        print(f"  {key:28s} {result[key]:8.1f} rows/s  ({1000 / result[key]:7.2f} ms/row)")
    print(
        f"  shuffled over sequential per-row cost: new streaming {result['shuffled_over_sequential']:.2f}x, "
        f"old {result['old_shuffled_over_sequential']:.1f}x; new shuffled = "
        f"{result['new_over_old_shuffled']:.0f}x the old shuffled rate"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40, help="scenes to synthesize (80%% train)")
    parser.add_argument("--rows", type=int, default=1024, help="rows in each layout")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--old-sample", type=int, default=48, help="shuffled indices timed on the old reader")
    parser.add_argument("--buffer", type=int, default=256, help="shuffle buffer rows of the new path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="new-path passes per figure (median)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    figures: dict[str, Any] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    }
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        data = synthesize(Path(tmp) / "synthetic", args.images, seed=0, image_size=(args.size, args.size))
        packed = pack_dataset(data.source("coco_panoptic", "train"), str(Path(tmp) / "packed"))
        print(
            f"{data.num_train} train images of {args.size}x{args.size} synthesized and packed in "
            f"{time.perf_counter() - start:.0f} s; each layout cycles over them to {args.rows} rows"
        )
        for shard_rows in (64, 256):
            uri = str(Path(tmp) / f"shards-{shard_rows}")
            figures[f"shards_{shard_rows}"] = layout_figures(packed, uri, shard_rows, args)
        figures["decode_rows_per_second"] = decode_rate(str(Path(tmp) / "shards-64"), rows=64)
    print(
        f"\ndecode_row (PNG + masks to tensors, one process): {figures['decode_rows_per_second']:.1f} rows/s"
    )
    worst = max(figures[f"shards_{n}"]["shuffled_over_sequential"] for n in (64, 256))
    figures["shuffled_over_sequential"] = worst
    print(f"shuffled_over_sequential (new streaming path, the worse layout): {worst:.2f} (goal <= 1.2)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

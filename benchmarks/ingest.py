"""Parquet ingest for one training worker: rows/s in shuffled and sequential order, the reader before
row groups against the row-group path and the Ray Data path training uses, for shards of 64 and 256
rows of 512x512 synthetic images; the Ray Data rate next to an R-50 train step's; its memory.

    python -m benchmarks.ingest [--images 40] [--rows 1024] [--size 512] [--old-sample 48]
        [--buffer 64] [--repeats 3] [--batch 2] [--step-repeats 2] [--layouts 64 256] [--no-ray]
        [--json figures.json]

Run it under ``flock /tmp/knet-slot-b.lock`` on a shared machine: it starts a local Ray
(``address="local"``, 4 logical CPUs, shut down at the end).

Synthesizes ``--images`` scenes (``knet data synth``'s generator), packs their train split with
``knet.data.pack_dataset``, then writes ``--rows`` rows cycling over those (same bytes, new image ids;
decoding and re-encoding 1024 images would take minutes) with ``knet.data.parquet.write_shards`` in two
layouts: ``shard_size`` 64 and 256 (``target_mb`` high enough for the row cap to decide), row groups at
the 8 MB default. Per layout it times, first with no decode (rows as the reader hands them over):

- old: ``ParquetReader._shard`` as it was before row groups (``whole_shard_per_index`` below): a row
  reads, hashes and ``to_pydict()``s its whole shard, one shard cached. Shuffled order is timed on the
  first ``--old-sample`` indices of a seeded permutation (it is slow), sequential order on every row.
- new, streaming: ``knet.data.shard_store.iter_rows`` over every row, sequential (``seed=None``) and
  shuffled (seeded block order + a ``--buffer``-row shuffle buffer, 64 as data.ingest.shuffle_buffer_rows); median of ``--repeats`` passes.
- new, random access: ``ParquetReader.row(i)`` (one row group per access) in shuffled order, on the
  same sample as the old reader.

Then rows/s DELIVERED to one training worker, decode + augment + collate INCLUDED on both sides
(``benchmarks.ingest_ray``):

- old: the old reader's shuffled sample, each row then ``prepare_train_row`` + ``normalize`` and
  collated by ``--batch`` in the worker's process (a DataLoader with 0 workers over the old reader);
- new: Ray Data as training runs it: ``knet_platform.train.ingest.train_dataset`` split for one worker
  by ``data_config()`` and consumed with ``iter_train_batches`` (``decode_sample`` + collate) in a
  1-CPU Ray actor standing in for the Train worker; read/decode/augment run in Ray Data tasks
  (``cpus_per_task`` 1; Ray has 4 logical CPUs on however many cores the machine has). Shuffled =
  ``train_dataset`` (seeded shard, row-group and row order, ``--buffer``-row local shuffle); sequential =
  the same map over the shards in storage order with buffer 0. One epoch each on a fresh dataset
  and actor, after a warm-up pass (which is also the memory base below).

Every new-path pass starts as a fresh process would: each shard is hashed once in it. The files
were just written, so they are read from the page cache: this measures the readers' own cost, not a
disk or S3. ``--json`` writes, besides every figure:

- ``shuffled_over_sequential``: the Ray Data path's shuffled per-row cost over its sequential one,
  the worse layout (goal <= 1.2), cost = CPU seconds per row of the consumer and every Ray process
  (this machine's cores are shared, and wall time moved by 1.7x either way between identical runs);
  the wall-time ratio is ``shuffled_over_sequential_wall``, the row-group reader's alone (no Ray, no
  decode) ``iter_rows_shuffled_over_sequential``;
- ``delivered_over_step_rate``: Ray Data shuffled rows/s (decode + augment included), the slower
  layout, over the images/s of an R-50 panoptic train step (``benchmarks.data_loader``'s
  measurement: forward + backward, 2 threads, median of ``--step-repeats`` after a warm-up, on a
  ``--batch`` batch of these rows with the same transforms) (goal >= 3);
- ``rss_growth_2x_shards``: the consumer actor's peak RSS streaming the first layout's ``--rows``
  rows over its peak streaming half of them (half the shards), shuffled (goal ~1.0). The Ray Data
  task processes' peak USS (largest and summed; USS leaves out the shared object store pages that RSS
  counts in every process mapping them) is recorded for both as well.
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

from benchmarks import ingest_ray
from benchmarks.data_loader import model_images_per_second
from knet import KNetConfig
from knet.data import DataSource, collate_batch, pack_dataset, synthesize
from knet.data.categories import CategoryTable
from knet.data.parquet import Manifest, ParquetReader, decode_row, load_manifest, write_shards
from knet.data.shard_store import clear_verified, iter_rows
from knet.data.streaming import prepare_train_row
from knet.data.transforms import normalize


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


def train_sample(row: dict[str, Any], index: int, experiment: Any, categories: CategoryTable) -> Any:
    """Row ``index`` as a map-style train dataset yields it in epoch 0 (decoded, augmented, normalised)."""
    transforms = experiment.data.transforms
    image, target, meta = prepare_train_row(
        row, index=index, epoch=0, seed=experiment.train.seed,
        categories=categories, transforms=transforms, name=f"row {index}",
    )  # fmt: skip
    return normalize(image, transforms.mean, transforms.std), target, meta


def old_shuffled(uri: str, sample: list[int], experiment: Any) -> tuple[float, float]:
    """Rows/s of the old reader on ``sample``: (rows read, rows delivered to the worker: read, then
    decoded + augmented + normalised and collated by the experiment's batch size, in this process)."""
    row = whole_shard_per_index(uri)
    categories = CategoryTable.from_dict(load_manifest(uri).categories)
    batch, pending = experiment.train.batch_size, []
    read = prepare = 0.0
    for i in sample:
        start = time.perf_counter()
        columns = row(i)
        middle = time.perf_counter()
        pending.append(train_sample(columns, i, experiment, categories))
        if len(pending) == batch or i == sample[-1]:
            collate_batch(pending)
            pending = []
        read, prepare = read + middle - start, prepare + time.perf_counter() - middle
    return len(sample) / read, len(sample) / (read + prepare)


def measure_layout(
    uri: str, experiment: Any, old_sample: int, buffer_rows: int, seed: int, repeats: int
) -> dict[str, float]:
    """Rows/s of the old and the new reader on the shards under ``uri``, shuffled and sequential."""
    reader = ParquetReader(DataSource("parquet", shards=uri))
    order = list(range(len(reader)))
    random.Random(seed).shuffle(order)
    sample = order[:old_sample]
    figures: dict[str, float] = {}
    figures["old_shuffled"], figures["old_shuffled_delivered"] = old_shuffled(uri, sample, experiment)
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


def step_rate(uri: str, experiment: Any, repeats: int) -> float:
    """Images/s of an R-50 panoptic train step (``benchmarks.data_loader``'s measurement, 2 threads)
    on the experiment's batch of the first rows under ``uri``, prepared as training prepares them."""
    reader = ParquetReader(DataSource("parquet", shards=uri))
    categories = CategoryTable.from_dict(reader.manifest.categories)
    samples = [
        train_sample(reader.row(i)[1], i, experiment, categories) for i in range(experiment.train.batch_size)
    ]
    loaded = collate_batch(samples)
    r50 = KNetConfig.for_task(
        "panoptic",
        num_thing_classes=categories.num_thing_classes,
        num_stuff_classes=categories.num_stuff_classes,
    )
    return model_images_per_second(r50, (loaded.images, loaded.targets, loaded.image_sizes), 2, repeats)


def write_layout(packed: Manifest, uri: str, rows: int, shard_rows: int) -> Manifest:
    """``rows`` rows cycling over ``packed`` under ``uri`` in ``shard_rows``-row shards."""
    manifest = Manifest(uri, packed.categories)
    write_shards(replicated_rows(packed.root, rows), manifest, shard_rows, target_mb=4096)
    return manifest


def layout_figures(
    packed: Manifest, uri: str, shard_rows: int, options: dict[str, Any], args: argparse.Namespace
) -> tuple[dict[str, float], Any]:
    """Write ``args.rows`` rows under ``uri`` in ``shard_rows``-row shards, time them, print the lines.
    Returns the figures and an experiment streaming those shards."""
    start = time.perf_counter()
    manifest = write_layout(packed, uri, args.rows, shard_rows)
    experiment = ingest_ray.write_experiment(Path(uri).parent, uri, **options)
    groups = len(manifest.shards[0].row_groups or [])
    mb = sum(s.num_bytes or 0 for s in manifest.shards) / len(manifest.shards) / 2**20
    print(
        f"\n{shard_rows}-row shards: {len(manifest.shards)} of {mb:.0f} MB, {groups} row groups each "
        f"(written in {time.perf_counter() - start:.0f} s); rows as read, no decode:"
    )
    result = measure_layout(uri, experiment, args.old_sample, args.buffer, args.seed, args.repeats)
    result.update(shard_mb=mb, row_groups_per_shard=groups, shards=len(manifest.shards))
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
    return result, experiment


def ray_figures(experiments: dict[int, Any], base: Any) -> dict[str, Any]:
    """Ray Data passes (``benchmarks.ingest_ray``) in a local Ray: the warm-up/memory-base pass over
    ``base``, then per layout one shuffled and one sequential epoch."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        start = time.perf_counter()
        ingest_ray.warm_workers(3)
        figures: dict[str, Any] = {"base": ingest_ray.one_pass(base, sequential=False)}
        for shard_rows, experiment in experiments.items():
            figures[f"shards_{shard_rows}"] = {
                "shuffled": ingest_ray.one_pass(experiment, sequential=False),
                "sequential": ingest_ray.one_pass(experiment, sequential=True),
            }
        figures["seconds"] = time.perf_counter() - start
    finally:
        ray.shutdown()
    return figures


def print_delivered(figures: dict[str, Any], layouts: list[int], batch: int) -> None:
    """The side-by-side table of rows/s delivered to one worker, and the Ray Data path's memory."""
    print(
        f"\ndelivered to one training worker, decode + augment + collate (batch {batch}) included; "
        "rows/s (wall) and CPU ms/row (all processes):"
        "\n  shards | old per-index shuffled | Ray Data shuffled | Ray/old | Ray sequential | "
        "shuf/seq cost: CPU, wall | consumer peak RSS shuf/seq MB | task USS peak largest/sum MB"
    )
    for n in layouts:
        layout, ray_pass = figures[f"shards_{n}"], figures["ray"][f"shards_{n}"]
        shuffled, sequential = ray_pass["shuffled"], ray_pass["sequential"]
        print(
            f"  {n:6d} | {layout['old_shuffled_delivered']:22.1f} | "
            f"{shuffled['rows_per_second']:5.1f} ({shuffled['cpu_ms_per_row']:4.0f} ms) | "
            f"{layout['ray_over_old_delivered']:6.1f}x | "
            f"{sequential['rows_per_second']:5.1f} ({sequential['cpu_ms_per_row']:3.0f} ms) | "
            f"{layout['ray_shuffled_over_sequential']:13.2f}, {layout['ray_shuffled_over_sequential_wall']:.2f} | "
            f"{shuffled['consumer_peak_rss_mb']:13.0f} / {sequential['consumer_peak_rss_mb']:<13.0f} | "
            f"{shuffled['task_peak_uss_mb']:.0f} / {shuffled['tasks_peak_uss_sum_mb']:.0f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=40, help="scenes to synthesize (80%% train)")
    parser.add_argument("--rows", type=int, default=1024, help="rows in each layout")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--old-sample", type=int, default=48, help="shuffled indices timed on the old reader")
    parser.add_argument("--buffer", type=int, default=64, help="shuffle buffer rows of the new paths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="iter_rows passes per figure (median)")
    parser.add_argument("--batch", type=int, default=2, help="train batch size (per worker)")
    parser.add_argument("--step-repeats", type=int, default=2, help="timed R-50 steps (median; 0: skip)")
    parser.add_argument("--layouts", type=int, nargs="+", default=[64, 256], help="rows per shard")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray Data passes")
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
        options = {"size": args.size, "buffer": args.buffer, "batch": args.batch, "seed": args.seed}
        experiments = {}
        for shard_rows in args.layouts:
            uri = str(Path(tmp) / f"shards-{shard_rows}")
            figures[f"shards_{shard_rows}"], experiments[shard_rows] = layout_figures(
                packed, uri, shard_rows, options, args
            )
        first = str(Path(tmp) / f"shards-{args.layouts[0]}")
        figures["decode_rows_per_second"] = decode_rate(first, rows=min(64, args.rows))
        print(
            f"\ndecode_row (PNG + masks to tensors, one process): {figures['decode_rows_per_second']:.1f} rows/s"
        )
        if args.step_repeats:
            start = time.perf_counter()
            figures["r50_step_images_per_second"] = step_rate(
                first, experiments[args.layouts[0]], args.step_repeats
            )
            print(
                f"R-50 panoptic train step, batch {args.batch}, 2 threads: "
                f"{figures['r50_step_images_per_second']:.2f} images/s (measured in {time.perf_counter() - start:.0f} s)"
            )
        if not args.no_ray:
            base_uri = str(Path(tmp) / "shards-base")
            write_layout(packed, base_uri, args.rows // 2, args.layouts[0])
            base = ingest_ray.write_experiment(Path(tmp), base_uri, **options)
            figures["ray"] = ray_figures(experiments, base)
    worst = max(figures[f"shards_{n}"]["shuffled_over_sequential"] for n in args.layouts)
    figures["iter_rows_shuffled_over_sequential"] = worst
    print(
        f"iter_rows shuffled over sequential per-row cost (row-group reader, the worse layout): {worst:.2f}"
    )
    if not args.no_ray:
        summarize_ray(figures, args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


def summarize_ray(figures: dict[str, Any], args: argparse.Namespace) -> None:
    """Derive and print the Ray Data path's three goal figures."""
    ray_figs = figures["ray"]
    for n in args.layouts:
        layout, passes = figures[f"shards_{n}"], ray_figs[f"shards_{n}"]
        shuffled, sequential = passes["shuffled"]["rows_per_second"], passes["sequential"]["rows_per_second"]
        layout["ray_shuffled_delivered"] = shuffled
        layout["ray_over_old_delivered"] = shuffled / layout["old_shuffled_delivered"]
        layout["ray_shuffled_over_sequential_wall"] = sequential / shuffled
        cost = passes["shuffled"]["cpu_ms_per_row"], passes["sequential"]["cpu_ms_per_row"]
        layout["ray_shuffled_over_sequential"] = cost[0] / cost[1]
    print_delivered(figures, args.layouts, args.batch)
    worst = max(figures[f"shards_{n}"]["ray_shuffled_over_sequential"] for n in args.layouts)
    figures["shuffled_over_sequential"] = worst
    wall = max(figures[f"shards_{n}"]["ray_shuffled_over_sequential_wall"] for n in args.layouts)
    figures["shuffled_over_sequential_wall"] = wall
    print(
        f"\nshuffled_over_sequential (Ray Data path, CPU ms/row, the worse layout): {worst:.2f} (goal <= 1.2); "
        f"by wall time {wall:.2f} (moves with whatever else runs on the cores)"
    )
    slowest = min(figures[f"shards_{n}"]["ray_shuffled_delivered"] for n in args.layouts)
    if "r50_step_images_per_second" in figures:
        figures["delivered_over_step_rate"] = slowest / figures["r50_step_images_per_second"]
        print(
            f"delivered_over_step_rate: {slowest:.1f} rows/s (Ray Data shuffled, the slower layout) over "
            f"{figures['r50_step_images_per_second']:.2f} images/s (R-50 step): "
            f"{figures['delivered_over_step_rate']:.0f} (goal >= 3)"
        )
    base, full = ray_figs["base"], ray_figs[f"shards_{args.layouts[0]}"]["shuffled"]
    figures["rss_growth_2x_shards"] = full["consumer_peak_rss_mb"] / base["consumer_peak_rss_mb"]
    figures["task_uss_sum_growth_2x_shards"] = full["tasks_peak_uss_sum_mb"] / base["tasks_peak_uss_sum_mb"]
    shards = figures[f"shards_{args.layouts[0]}"]["shards"]
    print(
        f"rss_growth_2x_shards: consumer peak RSS {full['consumer_peak_rss_mb']:.0f} MB with {shards} shards of "
        f"{args.layouts[0]} rows over {base['consumer_peak_rss_mb']:.0f} MB with {shards // 2}: "
        f"{figures['rss_growth_2x_shards']:.2f} (goal ~1.0); peak over the first half of the "
        f"{shards} shards' rows {full['consumer_peak_rss_first_half_mb']:.0f} MB; consumer peak USS "
        f"{full['consumer_peak_uss_mb']:.0f} over {base['consumer_peak_uss_mb']:.0f} MB; Ray Data task processes' summed peak USS "
        f"{full['tasks_peak_uss_sum_mb']:.0f} over {base['tasks_peak_uss_sum_mb']:.0f} MB: "
        f"{figures['task_uss_sum_growth_2x_shards']:.2f}; the consumer holds "
        f"{full['consumer_start_rss_mb']:.0f} MB before its first row (Python, torch, Ray); Ray passes took "
        f"{ray_figs['seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()

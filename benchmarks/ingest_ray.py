"""The Ray Data half of ``benchmarks.ingest``: one training worker's epoch through
``knet_platform.train.ingest`` (``train_dataset`` -> ``data_config()`` split for one worker ->
``iter_train_batches`` in a Ray actor that stands in for the Train worker), its rows/s and peak RSS.

A pass is one epoch on a fresh dataset and a fresh consumer actor (so its ``ru_maxrss`` is the pass's
own), timed inside the actor from the first ``iter_train_batches`` call to the last batch: read,
sha256, decode + augment + ``encode_sample`` in Ray Data tasks, then ``decode_sample`` + collate in
the consumer, as a Train worker gets its batches. Two orders:

- shuffled: ``train_dataset(experiment, 0)`` as training builds it (seeded shard and row-group order,
  ``data.ingest.shuffle_buffer_rows`` local shuffle in the consumer);
- sequential: the same map over the shards in storage order, row groups in file order, buffer 0.

The consumer samples its own RSS and USS (peaks, and the RSS peak over the first half of the rows).
While a pass runs, the driver samples the USS of the other Ray worker processes (Ray Data read/map
tasks and the split coordinator; idle workers left out): the largest one's and their sum, peaks.
Per-row cost is also taken as CPU time: the consumer's own plus every other process under the driver
(Ray's raylet, GCS, task workers), before/after the pass, over the rows; unlike wall time it hardly
moves when other work shares the cores.
"""

from __future__ import annotations

import importlib
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
import ray.data
from knet_platform.experiment.schema import Experiment, load_experiment
from knet_platform.knet_adapter import load_manifest
from knet_platform.train.ingest import (
    TRAIN,
    data_config,
    iter_train_batches,
    train_dataset,
)

# psutil is not a project dependency: Ray ships it (ray/thirdparty_files, on sys.path once ray is imported)
psutil = importlib.import_module("psutil")

EXPERIMENT = """\
name: ingest-benchmark
task: panoptic
data:
  train: {{format: parquet, shards: "{shards}"}}
  transforms:
    train_short_sides: [{short}, {size}]
    max_size: {max_size}
    crop_size: [{size}, {size}]
  ingest: {{engine: ray_data, shuffle_buffer_rows: {buffer}, cpus_per_task: 1, prefetch_batches: 2}}
train: {{batch_size: {batch}, seed: {seed}, metric: train/loss, mode: min}}
scaling: {{num_workers: 1, resources_per_worker: {{CPU: 1}}}}
"""


def write_experiment(
    folder: Path, shards: str, *, size: int, buffer: int, batch: int, seed: int
) -> Experiment:
    """An experiment streaming ``shards`` (transforms as ``benchmarks.data_loader``'s), via its YAML."""
    path = folder / f"ingest-{Path(shards).name}.yaml"
    path.write_text(
        EXPERIMENT.format(
            shards=shards,
            short=size * 3 // 4,
            size=size,
            max_size=size * 2,
            buffer=buffer,
            batch=batch,
            seed=seed,
        )
    )
    return load_experiment(path)


def sequential_experiment(experiment: Experiment) -> Experiment:
    """``experiment`` with no local shuffle buffer."""
    ingest = replace(experiment.data.ingest, shuffle_buffer_rows=0)
    return replace(experiment, data=replace(experiment.data, ingest=ingest))


class PeakRss:
    """Samples ``measure()`` (bytes, or (largest, sum)) every ``interval`` s in a thread; keeps peaks."""

    def __init__(self, measure: Callable[[], tuple[int, int]], interval: float = 0.02) -> None:
        self.measure, self.interval = measure, interval
        self.peak = (0, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                largest, total = self.measure()
            except psutil.Error:
                continue
            self.peak = (max(self.peak[0], largest), max(self.peak[1], total))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@ray.remote(num_cpus=1)
class Consumer:
    """One training worker's side of the stream (a Train worker reserves 1 CPU)."""

    def ready(self) -> tuple[int, int]:
        """Pid and RSS (bytes) once the modules are imported, before any data."""
        return psutil.Process().pid, psutil.Process().memory_info().rss

    def run(self, shard: Any, experiment: Experiment, expected_rows: int) -> dict[str, float]:
        process = psutil.Process()
        rows = batches = 0
        half = (0, 0)
        with PeakRss(lambda: _rss_uss(process), interval=0.05) as peak:
            cpu, start = _cpu_seconds(process), time.perf_counter()
            for batch, indices, _ in iter_train_batches(shard, experiment, epoch=0, rank=0, world_size=1):
                rows += len(indices)
                batches += 1
                del batch
                if rows <= expected_rows // 2:
                    half = peak.peak
            seconds, cpu = time.perf_counter() - start, _cpu_seconds(process) - cpu
        return {
            "rows": rows,
            "batches": batches,
            "seconds": seconds,
            "rows_per_second": rows / seconds,
            "consumer_cpu_seconds": cpu,
            "consumer_peak_rss_mb": peak.peak[0] / 2**20,
            "consumer_peak_uss_mb": peak.peak[1] / 2**20,
            "consumer_peak_rss_first_half_mb": half[0] / 2**20,
            "consumer_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
        }


def _rss_uss(process: Any) -> tuple[int, int]:
    info = process.memory_full_info()
    return info.rss, info.uss


def _cpu_seconds(process: Any) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _ray_cpu(exclude: set[int]) -> dict[int, float]:
    """CPU seconds so far of every process under this driver (Ray's raylet, GCS and workers: the
    Ray Data tasks, the split coordinator), by pid, leaving out ``exclude``."""
    seconds = {}
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid not in exclude:
                seconds[child.pid] = _cpu_seconds(child)
        except psutil.Error:
            continue
    return seconds


def _task_processes(exclude: set[int]) -> tuple[int, int]:
    """(largest, summed) USS of this driver's busy Ray worker processes, leaving out ``exclude`` (USS:
    RSS counts the shared object store pages again in every process that maps them)."""
    sizes = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.pid in exclude or not child.name().startswith("ray::") or "IDLE" in child.name():
                continue
            sizes.append(child.memory_full_info().uss)
        except psutil.Error:
            continue
    return (max(sizes, default=0), sum(sizes))


def one_pass(experiment: Experiment, *, sequential: bool) -> dict[str, float]:
    """One epoch of ``experiment``'s train split to one fresh consumer actor; its figures."""
    if sequential:
        experiment = sequential_experiment(experiment)
    dataset = train_dataset(experiment, 0, shuffle=not sequential)
    consumer = Consumer.remote()
    pid, idle_rss = ray.get(consumer.ready.remote())
    shard = data_config().configure({TRAIN: dataset}, world_size=1, worker_handles=None, worker_node_ids=None)
    expected = sum(info.num_rows for info in load_manifest(experiment.data.train.shards).shards)
    before = _ray_cpu({pid})
    with PeakRss(lambda: _task_processes({pid}), interval=0.2) as tasks:
        figures = ray.get(consumer.run.remote(shard[0][TRAIN], experiment, expected))
    after = _ray_cpu({pid})
    ray.kill(consumer)
    ray_cpu = sum(seconds - before.get(p, 0.0) for p, seconds in after.items())
    figures.update(
        consumer_start_rss_mb=idle_rss / 2**20,
        task_peak_uss_mb=tasks.peak[0] / 2**20,
        tasks_peak_uss_sum_mb=tasks.peak[1] / 2**20,
        ray_cpu_seconds=ray_cpu,
        cpu_ms_per_row=1000 * (ray_cpu + figures["consumer_cpu_seconds"]) / figures["rows"],
    )
    return figures


@ray.remote(num_cpus=1)
def _warm(seconds: float) -> int:
    """Import what the Ray Data tasks import, so the first timed pass does not pay it."""
    import knet_platform.train.ingest  # noqa: F401
    import torch  # noqa: F401

    time.sleep(seconds)
    return psutil.Process().pid


def warm_workers(count: int) -> None:
    """Start ``count`` Ray workers at once and import the ingest modules in each."""
    ray.get([_warm.remote(1.0) for _ in range(count)])

"""Row-group access to packed Parquet shards, and a seeded streaming order over (shard, row group) units.

Why: a shard holds tens to hundreds of MB, a training sample needs one row. Reading by row group
(``pyarrow.parquet.ParquetFile.read_row_group`` on an fsspec file, so local paths, ``memory://`` and
``s3://`` behave the same) reads a few MB per access instead of the whole shard.

Checksum rule (one check per shard per process): a shard's sha256 from the manifest is checked on its
first open in a process, by streaming the whole file through sha256 in 8 MB chunks (memory stays
flat) before any of its row groups is decoded. Later opens in the same process trust that check
unless the file's size changed. ``read_shard`` (a task that reads a whole shard, e.g. a Ray Data read
task) hashes the bytes it reads anyway and checks them in the same pass. A mismatch is one
``DataError`` naming the shard. A shard rewritten with the same size while a process runs is not
re-checked by that process.

Memory: the store holds per-shard and per-row-group row offsets (numbers, O(shards + row groups)),
never a per-row index or any annotation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from knet.data.errors import DataError

if TYPE_CHECKING:
    from knet.data.parquet import ShardInfo

_CHUNK = 8 << 20
# Row groups are decoded with use_threads=False: with Arrow's thread pool, about one process in three
# that had read row groups (after importing torch) aborted at exit with "terminate called without an
# active exception" (apache/arrow#34314); 0 in 20 without it. A row group of ~8 MB gains little from
# column threads, and the parallelism is across processes (DataLoader or Ray Data workers) anyway.
_VERIFIED: dict[tuple[str, str], int] = {}  # (protocol:path, sha256) -> file size checked in this process


def clear_verified() -> None:
    """Forget which shards this process has checked, so the next read of each hashes it again (a
    benchmark measuring a first epoch; a caller that knows files were rewritten in place)."""
    _VERIFIED.clear()


@dataclass(frozen=True)
class RowGroupUnit:
    """One readable unit: row group ``row_group`` of shard ``shard``; its rows are the dataset rows
    ``start .. start + num_rows - 1``."""

    shard: int
    row_group: int
    start: int
    num_rows: int


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


class ShardStore:
    """The shards of one manifest: verified opens, row-group reads, row lookup by offsets."""

    def __init__(self, uri: str, shards: Sequence[ShardInfo]) -> None:
        self.uri = str(uri)
        self.shards = list(shards)
        self._fs, self._root = fsspec.core.url_to_fs(self.uri)
        self._offsets = np.cumsum([0, *(s.num_rows for s in self.shards)])  # (S + 1,)
        self._groups: dict[int, np.ndarray] = {}  # shard -> cumulative row-group offsets (G + 1,)
        self._bad: dict[int, str] = {}  # shard -> its checksum error, raised again without re-reading
        for k, shard in enumerate(self.shards):
            if shard.row_groups is not None:
                self._groups[k] = np.cumsum([0, *shard.row_groups])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def name(self, k: int) -> str:
        """The shard's URI as the user wrote it, for messages."""
        return _join(self.uri, self.shards[k].path)

    def exists(self, k: int) -> bool:
        return bool(self._fs.exists(_join(self._root, self.shards[k].path)))

    def shard_start(self, k: int) -> int:
        """Dataset row index of shard ``k``'s first row."""
        return int(self._offsets[k])

    def _key(self, k: int) -> tuple[str, str]:
        protocol = self._fs.protocol if isinstance(self._fs.protocol, str) else self._fs.protocol[0]
        return f"{protocol}:{_join(self._root, self.shards[k].path)}", self.shards[k].sha256

    def _mismatch(self, k: int, digest: str) -> DataError:
        return DataError(
            f"checksum mismatch for Parquet shard {self.name(k)}: sha256 {digest[:12]}... but the "
            f"manifest says {self.shards[k].sha256[:12]}... (corrupted or rewritten; re-pack the dataset)"
        )

    def verify(self, k: int, size: int | None = None) -> None:
        """Check shard ``k``'s sha256 unless this process already did (for a file of ``size`` bytes)."""
        if k in self._bad:
            raise DataError(self._bad[k])
        key = self._key(k)
        if key in _VERIFIED and (size is None or _VERIFIED[key] == size):
            return
        digest, total = hashlib.sha256(), 0
        with self._fs.open(_join(self._root, self.shards[k].path), "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
                total += len(chunk)
        if digest.hexdigest() != self.shards[k].sha256:
            error = self._mismatch(k, digest.hexdigest())
            self._bad[k] = str(error)
            raise error
        _VERIFIED[key] = total

    def _parquet(self, k: int, source: Any) -> pq.ParquetFile:
        try:
            parquet = pq.ParquetFile(source)
        except (pa.ArrowException, OSError) as error:
            raise DataError(f"Parquet shard {self.name(k)} cannot be read: {error}") from None
        if parquet.metadata.num_rows != self.shards[k].num_rows:
            raise DataError(
                f"Parquet shard {self.name(k)} has {parquet.metadata.num_rows} rows, "
                f"manifest says {self.shards[k].num_rows}"
            )
        if k not in self._groups:  # a manifest written before row groups were recorded
            counts = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
            self._groups[k] = np.cumsum([0, *counts])
        return parquet

    def read_row_group(self, k: int, group: int) -> pa.Table:
        """Row group ``group`` of shard ``k`` (the shard checked first if this process has not yet)."""
        with self._fs.open(_join(self._root, self.shards[k].path), "rb") as handle:
            self.verify(k, size=handle.size)
            return self._parquet(k, handle).read_row_group(group, use_threads=False)

    def read_shard(self, k: int) -> Iterator[pa.Table]:
        """Every row group of shard ``k`` in order, from one read of the file that is also hashed."""
        with self._fs.open(_join(self._root, self.shards[k].path), "rb") as handle:
            data = handle.read()
        digest = hashlib.sha256(data).hexdigest()
        if digest != self.shards[k].sha256:
            raise self._mismatch(k, digest)
        _VERIFIED[self._key(k)] = len(data)
        parquet = self._parquet(k, pa.BufferReader(data))
        for group in range(parquet.num_row_groups):
            yield parquet.read_row_group(group, use_threads=False)

    def group_offsets(self, k: int) -> np.ndarray:
        """Cumulative row counts of shard ``k``'s row groups, (G + 1,); an old manifest's from the footer."""
        if k not in self._groups:
            with self._fs.open(_join(self._root, self.shards[k].path), "rb") as handle:
                self.verify(k, size=handle.size)
                self._parquet(k, handle)
        return self._groups[k]

    def locate(self, index: int) -> tuple[int, int, int]:
        """Dataset row ``index`` -> (shard, row group, row within the group)."""
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        k = int(np.searchsorted(self._offsets, index, side="right")) - 1
        row = index - int(self._offsets[k])
        groups = self.group_offsets(k)
        g = int(np.searchsorted(groups, row, side="right")) - 1
        return k, g, row - int(groups[g])

    def units(self) -> list[RowGroupUnit]:
        """Every (shard, row group) unit in storage order."""
        out = []
        for k in range(len(self.shards)):
            groups = self.group_offsets(k)
            for g in range(len(groups) - 1):
                start = int(self._offsets[k] + groups[g])
                out.append(RowGroupUnit(k, g, start, int(groups[g + 1] - groups[g])))
        return out


@dataclass
class ShardLayout:
    """Sizes as written (from the shard footers): per shard and per row group, bytes and rows."""

    shard_bytes: list[int]
    shard_rows: list[int]
    group_bytes: list[int]  # compressed column-chunk bytes of each row group
    group_rows: list[int]

    def lines(self) -> list[str]:
        """Two summary lines: count, total, median and range of bytes and rows."""
        groups_per_shard = len(self.group_rows) / max(len(self.shard_rows), 1)
        return [
            f"shards: {len(self.shard_rows)}, {sum(self.shard_rows)} rows, {_mb(sum(self.shard_bytes))} "
            f"(per shard {_spread(self.shard_bytes, _mb)}; {_spread(self.shard_rows, str)} rows)",
            f"row groups: {len(self.group_rows)}, {groups_per_shard:.1f} per shard "
            f"(per group {_spread(self.group_bytes, _mb)}; {_spread(self.group_rows, str)} rows)",
        ]


def _mb(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.1f} MB"


def _spread(values: list[int], show: Any) -> str:
    if not values:
        return "none"
    return f"median {show(int(np.median(values)))}, {show(min(values))}..{show(max(values))}"


def shard_layout(store: ShardStore) -> ShardLayout:
    """Read every shard's footer (not its data, not checked) for ``knet data check``'s size report."""
    layout = ShardLayout([], [], [], [])
    for k, shard in enumerate(store.shards):
        with store._fs.open(_join(store._root, shard.path), "rb") as handle:
            layout.shard_bytes.append(int(handle.size))
            metadata = store._parquet(k, handle).metadata
        layout.shard_rows.append(metadata.num_rows)
        for g in range(metadata.num_row_groups):
            group = metadata.row_group(g)
            layout.group_rows.append(group.num_rows)
            layout.group_bytes.append(
                sum(group.column(c).total_compressed_size for c in range(group.num_columns))
            )
    return layout


def epoch_units(units: Sequence[RowGroupUnit], seed: int, epoch: int) -> list[RowGroupUnit]:
    """The block order of an epoch: ``units`` permuted by ``(seed, epoch)``; the same on every process,
    so ranks can split it (``units[rank::world]``) without talking to each other."""
    order = np.random.default_rng([seed, epoch, 0]).permutation(len(units))
    return [units[i] for i in order]


def iter_rows(
    store: ShardStore,
    units: Sequence[RowGroupUnit] | None = None,
    *,
    seed: int | None = None,
    epoch: int = 0,
    buffer_rows: int = 256,
) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(dataset row index, row dict)`` for every row of ``units`` (default: all), each exactly once.

    ``seed=None``: storage order. Otherwise a seeded shuffle as Ray Data does it: the block order is
    ``epoch_units(units, seed, epoch)``, then rows pass through a buffer of ``buffer_rows`` from which a
    random one leaves at each step. Each unit is read once (one row group), so a shuffled epoch reads
    the same bytes as a sequential one; memory is one row group plus the buffer.
    """
    units = store.units() if units is None else list(units)
    if seed is None:
        for unit in units:
            table = store.read_row_group(unit.shard, unit.row_group)
            yield from enumerate(table.to_pylist(), start=unit.start)
        return
    rng = np.random.default_rng([seed, epoch, 1])
    buffer: list[tuple[int, dict[str, Any]]] = []
    for unit in epoch_units(units, seed, epoch):
        table = store.read_row_group(unit.shard, unit.row_group)
        for item in enumerate(table.to_pylist(), start=unit.start):
            buffer.append(item)
            if len(buffer) >= max(buffer_rows, 1):
                yield _pop_random(buffer, rng)
    while buffer:
        yield _pop_random(buffer, rng)


def _pop_random(buffer: list[Any], rng: np.random.Generator) -> Any:
    """Remove and return a random item in O(1) (swap with the last)."""
    i = int(rng.integers(len(buffer)))
    buffer[i], buffer[-1] = buffer[-1], buffer[i]
    return buffer.pop()


__all__ = [
    "RowGroupUnit",
    "ShardLayout",
    "ShardStore",
    "clear_verified",
    "epoch_units",
    "iter_rows",
    "shard_layout",
]

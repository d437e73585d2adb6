"""Training checkpoints: one folder, written atomically, read back with ``torch.load(weights_only=True)``.

A checkpoint folder holds

- ``model/``: a complete model bundle (weights, model config, category table, test transforms: what
  ``knet predict --model`` reads), so registering a checkpoint copies files and needs neither the
  dataset nor the optimizer state;
- ``state.pt``: what resuming needs beyond the weights: optimizer, scheduler and grad-scaler state
  dicts, epoch, global step and every worker's RNG states of Python, NumPy and torch as plain ints,
  floats and tensors, so ``torch.load(weights_only=True)`` reads all of it and nothing is unpickled;
- ``metadata.json``: its epoch, step and ranking metric, readable without torch, and the sha256 of
  every other file of the checkpoint (``state.pt`` and each file under ``model/``), computed from the
  written bytes before the folder is renamed into place.

Loading (:func:`load_checkpoint`, :func:`load_model_weights`, :func:`require_checkpoint`) checks every
recorded digest first, so a file damaged after the save (a bad disk, a copy cut short or altered) is
refused by name instead of loading part of a state or silently wrong weights. A checkpoint written
before checkpoints carried digests loads as before, unchecked.

Writing goes to a temporary sibling folder whose files are fsynced before it is renamed into place (and
the parent folder fsynced after), so a crash or power loss mid-write never leaves a half checkpoint
under the checkpoint's name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from knet_platform.errors import KnetUserError
from knet_platform.knet_adapter import UnsafeWeightsError, load_tensors

STATE_FILE = "state.pt"
METADATA_FILE = "metadata.json"
MODEL_DIR = "model"
WEIGHTS_FILE = "weights.pt"  # inside MODEL_DIR, as the model bundle names it


RngState = dict[str, Any]  # what capture_rng_state returns: ints, floats, None and tensors only


class CorruptCheckpointError(KnetUserError, ValueError):
    """A checkpoint file is truncated or damaged: not a complete torch archive, or its sha256 differs
    from the one ``metadata.json`` recorded when it was saved."""


class CheckpointNotFoundError(KnetUserError, FileNotFoundError):
    """A folder given as a checkpoint is not a complete knet training checkpoint."""


@dataclass
class TrainingState:
    """Everything a resumed run needs, besides the model weights, to continue bit-for-bit where it
    stopped.

    epoch: the number of epochs completed (training resumes at this epoch index).
    global_step: optimizer steps taken so far (drives the warmup schedule).
    rng: one :func:`capture_rng_state` per worker, indexed by world rank.
    """

    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    epoch: int
    global_step: int
    rng: list[RngState]


@dataclass(frozen=True)
class CheckpointScore:
    """How a checkpoint ranks: ``train.metric`` (e.g. ``val/pq``), ``train.mode`` (``max`` / ``min``)
    and the metric's value at the checkpoint's epoch (None when it was not reported or not finite)."""

    metric: str
    mode: str
    value: float | None

    @classmethod
    def from_metrics(cls, metric: str, mode: str, metrics: dict[str, Any]) -> CheckpointScore:
        """The score of an epoch that reported ``metrics`` (``{"val/pq": 41.2, ...}``)."""
        value = metrics.get(metric)
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        return cls(metric=metric, mode=mode, value=float(value) if finite else None)


@dataclass(frozen=True)
class CheckpointMetadata:
    """``metadata.json``: what a person browsing checkpoints needs to pick one, without loading tensors,
    and what loading needs to tell an intact checkpoint from a damaged one.

    score is None for a checkpoint saved without one. sha256 maps each file of the checkpoint, by its
    path relative to the checkpoint folder (``state.pt``, ``model/weights.pt``, ...), to its hex
    digest; None for a checkpoint written before checkpoints carried digests (it loads unchecked).
    """

    epoch: int
    global_step: int
    score: CheckpointScore | None
    sha256: dict[str, str] | None = None


def capture_rng_state() -> RngState:
    """This process's RNG states of Python, NumPy (legacy global generator) and torch (CPU, and CUDA
    when present), as values ``torch.load(weights_only=True)`` accepts: ints, floats, None, tensors.

    Python: ``random.getstate()`` is (version, 625 32-bit words, gauss_next). NumPy:
    ``np.random.get_state()`` is ('MT19937', 624 uint32 keys, pos, has_gauss, cached_gaussian).
    """
    version, words, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    if kind != "MT19937":
        raise ValueError(f"NumPy's global generator is {kind!r}; only MT19937 states are checkpointed")
    states: RngState = {
        "python": {
            "version": int(version),
            "words": torch.tensor(words, dtype=torch.int64),  # (625,)
            "gauss_next": None if gauss_next is None else float(gauss_next),
        },
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),  # (624,)
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),  # (5056,) uint8
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.stack(torch.cuda.get_rng_state_all())  # (num_devices, state_bytes)
    return states


def restore_rng_state(states: RngState) -> None:
    """Inverse of :func:`capture_rng_state`: the next random numbers equal those after the capture."""
    python, numpy_state = states["python"], states["numpy"]
    words = tuple(int(word) for word in python["words"].tolist())
    random.setstate((int(python["version"]), words, python["gauss_next"]))
    np.random.set_state(
        (
            "MT19937",
            numpy_state["keys"].numpy().astype(np.uint32),
            int(numpy_state["pos"]),
            int(numpy_state["has_gauss"]),
            float(numpy_state["cached_gaussian"]),
        )
    )
    torch.set_rng_state(states["torch"].cpu())
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])


def rng_state_for_rank(states: list[RngState] | Any, rank: int, world_size: int) -> RngState | None:
    """This worker's RNG state from a checkpoint's per-rank list, or None when the checkpoint cannot
    give one: it was written by a different number of workers, or in an older (pickled) format that is
    never loaded. The caller then seeds afresh and says so."""
    if not isinstance(states, list) or len(states) != world_size:
        return None
    state = states[rank]
    if not (isinstance(state, dict) and isinstance(state.get("python"), dict)):
        return None
    return state


def save_checkpoint(
    directory: str | Path,
    state: TrainingState,
    *,
    write_model: Callable[[Path], None],
    score: CheckpointScore | None = None,
) -> Path:
    """Write a checkpoint to ``directory`` atomically: ``write_model(folder)`` writes the model bundle
    into ``model/``, ``state`` goes to ``state.pt``, and its ``score`` and the sha256 of every file
    written (read back from the staging folder) into ``metadata.json``.

    Every file is written and fsynced in a temporary sibling folder, which is then renamed to
    ``directory``. An existing folder of the same name is replaced only after the new one is complete
    (moved aside, new one renamed in, old one deleted: a crash between the two renames leaves the old
    checkpoint under ``.<name>.old-<pid>``, never a partial one under ``<name>``).
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write_model(staging / MODEL_DIR)
        _fsync_tree(staging / MODEL_DIR)
        with open(staging / STATE_FILE, "wb") as file:
            torch.save(dataclasses.asdict(state), file)
            file.flush()
            os.fsync(file.fileno())
        metadata = CheckpointMetadata(
            epoch=state.epoch, global_step=state.global_step, score=score, sha256=_file_digests(staging)
        )
        _write_synced(staging / METADATA_FILE, json.dumps(_metadata_to_dict(metadata), indent=2))
        _fsync_directory(staging)
        _replace_directory(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> TrainingState:
    """The training state of a folder written by :func:`save_checkpoint`; weights only, no code runs.

    Raises CheckpointNotFoundError when the folder is not a complete checkpoint and
    :class:`CorruptCheckpointError` when a file's sha256 differs from the one recorded at save time or
    ``state.pt`` is truncated (e.g. a copy into storage cut short by a crash), rather than loading part
    of a state.
    """
    payload = _load_tensors(require_checkpoint(directory) / STATE_FILE, map_location)
    return TrainingState(
        optimizer=payload["optimizer"],
        scheduler=payload["scheduler"],
        scaler=payload["scaler"],
        epoch=int(payload["epoch"]),
        global_step=int(payload["global_step"]),
        rng=payload["rng"],
    )


def load_model_weights(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The model's state dict from a checkpoint folder (its ``model/`` bundle), weights only, after the
    same checks as :func:`load_checkpoint`."""
    return _load_tensors(model_dir(require_checkpoint(directory)) / WEIGHTS_FILE, map_location)


def model_dir(directory: str | Path) -> Path:
    """The model bundle inside a checkpoint folder (what registering a checkpoint logs)."""
    return Path(directory) / MODEL_DIR


def require_checkpoint(directory: str | Path) -> Path:
    """``directory`` if it holds a complete, intact checkpoint, else a CheckpointNotFoundError naming the
    folder and what is missing (``state.pt``, the model bundle's weights, or a file ``metadata.json``
    lists), or a :class:`CorruptCheckpointError` naming the file whose sha256 differs from the recorded
    one. A checkpoint without recorded digests (written before they existed) is not checked."""
    directory = Path(directory)
    expected = _recorded_digests(directory)
    for needed in (STATE_FILE, f"{MODEL_DIR}/{WEIGHTS_FILE}", *sorted(expected)):
        if not (directory / needed).is_file():
            raise CheckpointNotFoundError(
                f"{directory} is not a knet training checkpoint: {needed} is missing. Pass the folder of "
                f"a checkpoint written by `knet run` (it holds {MODEL_DIR}/, {STATE_FILE} and {METADATA_FILE})."
            )
    for relative, recorded in sorted(expected.items()):
        actual = _sha256(directory / relative)
        if actual != recorded:
            raise CorruptCheckpointError(
                f"{directory / relative} is truncated or damaged: its sha256 is {actual}, but {METADATA_FILE} "
                f"recorded {recorded} when the checkpoint was saved. Resume from another checkpoint folder."
            )
    return directory


def _recorded_digests(directory: Path) -> dict[str, str]:
    """The digests ``metadata.json`` recorded; empty when there is no metadata or it has no digests."""
    if not (directory / METADATA_FILE).is_file():
        return {}
    try:
        return dict(read_checkpoint_metadata(directory).sha256 or {})
    except (ValueError, KeyError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise CorruptCheckpointError(
            f"{directory / METADATA_FILE} is truncated or damaged ({error!r}), so the checkpoint's files "
            "cannot be checked. Resume from another checkpoint folder."
        ) from error


def _file_digests(folder: Path) -> dict[str, str]:
    """The sha256 of every file below ``folder`` (the staging folder of a save), by relative path."""
    return {
        path.relative_to(folder).as_posix(): _sha256(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path != folder / METADATA_FILE
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()  # read in chunks (hashlib.file_digest needs Python 3.11)
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _load_tensors(path: Path, map_location: str | torch.device) -> Any:
    if not zipfile.is_zipfile(path):  # torch.save's format; a cut-short file lacks the zip's end record
        raise CorruptCheckpointError(
            f"{path} is truncated or damaged (not a complete torch zip archive): it was not "
            "written by a completed save. Resume from another checkpoint folder."
        )
    try:
        return load_tensors(
            path,
            map_location=map_location,
            fix="knet's checkpoints hold tensors and plain values only: resume from a checkpoint folder "
            "written by `knet run`, or re-save the file with plain state dicts (tensors only).",
        )
    except UnsafeWeightsError as error:
        raise CorruptCheckpointError(str(error)) from None


def read_checkpoint_metadata(directory: str | Path) -> CheckpointMetadata:
    """The epoch, step, score and file digests of a checkpoint folder, from its ``metadata.json`` (no
    torch load); ``sha256`` is None for a checkpoint saved before digests were recorded."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{directory} has no {METADATA_FILE}: it is not a knet checkpoint, or one written before "
            "checkpoints carried metadata (its state.pt still loads with load_checkpoint)."
        )
    raw = json.loads(path.read_text())
    score = raw.get("score")
    return CheckpointMetadata(
        epoch=int(raw["epoch"]),
        global_step=int(raw["global_step"]),
        score=CheckpointScore(score["metric"], score["mode"], score["value"]) if score else None,
        sha256={str(name): str(digest) for name, digest in raw["sha256"].items()}
        if raw.get("sha256")
        else None,
    )


def _metadata_to_dict(metadata: CheckpointMetadata) -> dict[str, Any]:
    score = metadata.score
    if score is not None and score.value is not None and not math.isfinite(score.value):
        raise ValueError(
            f"{score.metric}={score.value} cannot go into JSON: use CheckpointScore.from_metrics"
        )
    return dataclasses.asdict(metadata)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())


def _replace_directory(staging: Path, directory: Path) -> None:
    if directory.exists():
        retired = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        os.replace(directory, retired)
        os.replace(staging, directory)
        shutil.rmtree(retired)
    else:
        os.replace(staging, directory)
    _fsync_directory(directory.parent)


def _fsync_tree(folder: Path) -> None:
    """fsync every file below ``folder`` and the folders themselves (the bundle writer does not)."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        else:
            _fsync_directory(path)
    _fsync_directory(folder)


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (its entry list reaches the disk)."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)

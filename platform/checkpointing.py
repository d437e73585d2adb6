"""Training checkpoints: one folder, written atomically, read back with ``torch.load(weights_only=True)``.

A checkpoint folder holds ``state.pt`` (model, optimizer, scheduler and grad-scaler state dicts, epoch,
global step and the RNG states of Python, NumPy and torch stored as uint8 tensors so the safe loader
accepts them) and ``experiment.json`` (the resolved experiment it was trained with). Writing goes to a
temporary sibling folder that is renamed into place, so a crash mid-write never leaves a half checkpoint
where a resume would find it.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"
EXPERIMENT_FILE = "experiment.json"


@dataclass
class TrainingState:
    """Everything a resumed run needs to continue bit-for-bit where it stopped.

    epoch: the number of epochs completed (training resumes at this epoch index).
    global_step: optimizer steps taken so far (drives the warmup schedule).
    """

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    epoch: int
    global_step: int
    rng: dict[str, torch.Tensor]
    experiment: dict[str, Any]


def capture_rng_state() -> dict[str, torch.Tensor]:
    """The RNG states of Python, NumPy and torch (CPU, and CUDA when present) as tensors.

    Python's and NumPy's states are pickled into uint8 tensors: ``weights_only=True`` loading refuses
    arbitrary objects but accepts tensors.
    """
    states = {
        "python": _bytes_to_tensor(pickle.dumps(random.getstate())),
        "numpy": _bytes_to_tensor(pickle.dumps(np.random.get_state())),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.stack(torch.cuda.get_rng_state_all())  # (num_devices, state_bytes)
    return states


def restore_rng_state(states: dict[str, torch.Tensor]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    random.setstate(pickle.loads(_tensor_to_bytes(states["python"])))
    np.random.set_state(pickle.loads(_tensor_to_bytes(states["numpy"])))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(states["cuda"]))


def save_checkpoint(directory: str | Path, state: TrainingState) -> Path:
    """Write ``state`` to ``directory`` atomically (temp folder + rename) and return the folder.

    An existing folder of the same name is replaced only after the new one is complete.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        payload = {
            "model": state.model,
            "optimizer": state.optimizer,
            "scheduler": state.scheduler,
            "scaler": state.scaler,
            "epoch": state.epoch,
            "global_step": state.global_step,
            "rng": state.rng,
        }
        torch.save(payload, staging / STATE_FILE)
        (staging / EXPERIMENT_FILE).write_text(json.dumps(state.experiment, indent=2, sort_keys=True))
        if directory.exists():
            retired = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, retired)
            os.replace(staging, directory)
            shutil.rmtree(retired)
        else:
            os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> TrainingState:
    """Read a folder written by :func:`save_checkpoint`; weights only, no code runs on load."""
    directory = Path(directory)
    state_path = directory / STATE_FILE
    if not state_path.is_file():
        raise FileNotFoundError(
            f"{directory} is not a knet training checkpoint: {STATE_FILE} is missing. "
            "Pass the folder of a checkpoint written by `knet run` (it holds state.pt and experiment.json)."
        )
    payload = torch.load(state_path, map_location=map_location, weights_only=True)
    experiment_path = directory / EXPERIMENT_FILE
    experiment = json.loads(experiment_path.read_text()) if experiment_path.is_file() else {}
    return TrainingState(
        model=payload["model"],
        optimizer=payload["optimizer"],
        scheduler=payload["scheduler"],
        scaler=payload["scaler"],
        epoch=int(payload["epoch"]),
        global_step=int(payload["global_step"]),
        rng=payload["rng"],
        experiment=experiment,
    )


def _bytes_to_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def _tensor_to_bytes(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.cpu().numpy().tobytes())

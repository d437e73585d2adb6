"""Checkpoint folders: they round-trip the model and the training state, carry a model bundle that
loads on its own, record their metadata in plain JSON, are never taken for one when a write was cut
short or failed, hold no pickled objects, and round-trip every worker's RNG state."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from knet_platform.knet_adapter import load_bundle
from knet_platform.train.checkpoints import (
    METADATA_FILE,
    STATE_FILE,
    CheckpointNotFoundError,
    CheckpointScore,
    CorruptCheckpointError,
    TrainingState,
    capture_rng_state,
    load_checkpoint,
    load_model_weights,
    model_dir,
    read_checkpoint_metadata,
    require_checkpoint,
    restore_rng_state,
    rng_state_for_rank,
    save_checkpoint,
)
from torch import nn

from tests.knet_platform.serve.test_predict import tiny_bundle


def _draws() -> tuple[float, float, float, torch.Tensor]:
    """The next numbers of every generator a worker uses (Python, Python's gauss, NumPy, torch)."""
    return random.random(), random.gauss(0, 1), float(np.random.rand()), torch.rand(3)


def _state(epoch: int, model: nn.Module | None = None) -> TrainingState:
    optimizer = torch.optim.AdamW((model or nn.Linear(4, 2)).parameters(), lr=1e-3)
    return TrainingState(
        optimizer=optimizer.state_dict(),
        scheduler={},
        scaler=None,
        epoch=epoch,
        global_step=epoch * 3,
        rng=[capture_rng_state()],
    )


def _weights(model: nn.Module):  # noqa: ANN202 - a write_model callback
    """A stand-in for the model bundle writer: the state dict under the bundle's weights name."""

    def write(folder: Path) -> None:
        folder.mkdir()
        torch.save(model.state_dict(), folder / "weights.pt")

    return write


def _save(folder: Path, epoch: int, **kwargs: object) -> Path:
    return save_checkpoint(folder, _state(epoch), write_model=_weights(nn.Linear(4, 2)), **kwargs)


def test_a_checkpoint_round_trips_the_weights_and_the_training_state(tmp_path: Path) -> None:
    model = nn.Linear(4, 2)
    state = _state(epoch=2, model=model)
    folder = save_checkpoint(tmp_path / "ckpt", state, write_model=_weights(model))
    loaded = load_checkpoint(folder)
    assert (loaded.epoch, loaded.global_step) == (2, 6)
    assert loaded.optimizer["param_groups"][0]["lr"] == state.optimizer["param_groups"][0]["lr"]
    weights = load_model_weights(folder)
    assert weights.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(weights[key], value)


def test_a_checkpoints_model_folder_is_a_bundle_that_loads_without_the_training_state(tmp_path: Path) -> None:
    """Registering a checkpoint logs its model folder as it is: no dataset, no optimizer state."""
    folder = save_checkpoint(tmp_path / "ckpt", _state(epoch=1), write_model=tiny_bundle)
    (folder / STATE_FILE).unlink()  # the bundle does not need it
    bundle = load_bundle(model_dir(folder))
    assert bundle.categories.names and bundle.config.num_classes == len(bundle.categories.names)
    (prediction,) = bundle.predict([np.zeros((40, 50, 3), dtype=np.uint8)])
    assert getattr(prediction, bundle.config.task) is not None


def test_metadata_records_the_epoch_step_and_the_ranking_metric_in_plain_json(tmp_path: Path) -> None:
    score = CheckpointScore.from_metrics("val/pq", "max", {"val/pq": 41.25, "train/loss": 2.0})
    folder = _save(tmp_path / "ckpt", 2, score=score)

    metadata = read_checkpoint_metadata(folder)
    assert (metadata.epoch, metadata.global_step) == (2, 6)
    assert metadata.score == CheckpointScore(metric="val/pq", mode="max", value=41.25)
    # readable without torch, e.g. in the MLflow artifact browser
    raw = json.loads((folder / METADATA_FILE).read_text())
    raw.pop("sha256")  # the file digests: see test_metadata_lists_the_sha256_of_every_file_of_the_checkpoint
    assert raw == {"epoch": 2, "global_step": 6, "score": {"metric": "val/pq", "mode": "max", "value": 41.25}}


def test_a_metric_that_is_missing_or_not_finite_is_recorded_as_null(tmp_path: Path) -> None:
    assert CheckpointScore.from_metrics("val/pq", "max", {"train/loss": 1.0}).value is None
    score = CheckpointScore.from_metrics("val/pq", "max", {"val/pq": math.nan})
    assert score.value is None
    folder = _save(tmp_path / "ckpt", 1, score=score)
    assert json.loads((folder / METADATA_FILE).read_text())["score"]["value"] is None
    with pytest.raises(ValueError, match="cannot go into JSON"):
        _save(tmp_path / "other", 1, score=CheckpointScore("val/pq", "max", math.inf))


def test_a_truncated_state_file_is_refused_naming_the_file(tmp_path: Path) -> None:
    folder = _save(tmp_path / "ckpt", 1)
    state_path = folder / STATE_FILE
    state_path.write_bytes(state_path.read_bytes()[: state_path.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match=rf"{state_path} is truncated or damaged"):
        load_checkpoint(folder)


# A writer that is SIGKILLed inside torch.save: the object below blocks while being pickled.
_KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from knet_platform.train.checkpoints import TrainingState, capture_rng_state, save_checkpoint

    class BlocksWhilePickled:
        def __reduce__(self):
            Path(sys.argv[2]).write_text("inside torch.save")
            time.sleep(600)

    def write_model(folder):
        folder.mkdir()
        torch.save({"weight": torch.ones(256, 256)}, folder / "weights.pt")

    save_checkpoint(sys.argv[1], TrainingState(
        optimizer={"blocks": BlocksWhilePickled()}, scheduler={}, scaler=None, epoch=2, global_step=6,
        rng=[capture_rng_state()],
    ), write_model=write_model)
    """
)


def test_a_writer_killed_mid_save_leaves_the_previous_checkpoint_whole_under_its_name(tmp_path: Path) -> None:
    target = tmp_path / "checkpoint_epoch_0001"
    _save(target, 1, score=CheckpointScore("val/pq", "max", 10.0))
    marker = tmp_path / "writing"
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target), str(marker)])
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert writer.poll() is None, "the writer exited before it reached torch.save"
            assert time.time() < deadline, "the writer did not reach torch.save in 120 s"
            time.sleep(0.05)
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=30)

    # the name still holds the complete previous checkpoint ...
    assert load_checkpoint(target).epoch == 1 and read_checkpoint_metadata(target).epoch == 1
    # ... and the half-written one sits in a hidden staging folder that nothing loads as a checkpoint
    (leftover,) = [p for p in tmp_path.iterdir() if p.name != target.name and p != marker]
    assert leftover.name.startswith(f".{target.name}.tmp-")
    assert not (leftover / METADATA_FILE).exists()
    with pytest.raises(CorruptCheckpointError):
        load_checkpoint(leftover)
    # the next writer (the resumed run) replaces it cleanly
    _save(target, 2)
    assert load_checkpoint(target).epoch == 2


def test_every_workers_rng_state_round_trips_through_a_checkpoint_file(tmp_path: Path) -> None:
    states, expected = [], []
    for rank in range(2):  # two "workers": each captures its own state, then draws
        random.seed(100 + rank)
        np.random.seed(200 + rank)
        torch.manual_seed(300 + rank)
        random.gauss(0, 1)  # leaves a cached Gaussian: Python's state then holds a float too
        np.random.standard_normal()  # and NumPy's a cached one
        states.append(capture_rng_state())
        expected.append(_draws())
    state = _state(epoch=1)
    state.rng = states
    folder = save_checkpoint(tmp_path / "ckpt", state, write_model=_weights(nn.Linear(4, 2)))

    loaded = load_checkpoint(folder).rng
    for rank in range(2):
        random.seed(0)  # the generators are somewhere else entirely ...
        np.random.seed(0)
        torch.manual_seed(0)
        restore_rng_state(rng_state_for_rank(loaded, rank, world_size=2))
        again = _draws()  # ... and after the restore they continue exactly where that worker was
        assert again[:3] == expected[rank][:3] and torch.equal(again[3], expected[rank][3]), rank
    # a checkpoint of 2 workers gives a 4-worker run no state (each worker is seeded afresh instead)
    assert rng_state_for_rank(loaded, 0, world_size=4) is None


def test_a_state_file_holds_nothing_the_weights_only_loader_refuses(tmp_path: Path) -> None:
    folder = _save(tmp_path / "ckpt", 1)
    state_path = folder / STATE_FILE
    # every global referenced by the pickle inside state.pt is one weights_only allows: no Python
    # object (and so no pickled RNG state) is rebuilt on load
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(state_path)) == []
    payload = torch.load(state_path, weights_only=True)
    (rng,) = payload["rng"]
    assert isinstance(rng["python"]["version"], int) and rng["python"]["words"].dtype == torch.int64
    assert isinstance(rng["numpy"]["pos"], int) and rng["numpy"]["keys"].shape == (624,)


def test_a_failed_write_keeps_the_previous_checkpoint_and_leaves_no_temp_folder(tmp_path: Path) -> None:
    _save(tmp_path / "ckpt", 1)

    def broken(folder: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "ckpt", _state(epoch=2), write_model=broken)
    assert load_checkpoint(tmp_path / "ckpt").epoch == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_loading_refuses_pickled_objects(tmp_path: Path) -> None:
    folder = _save(tmp_path / "ckpt", 1)
    _drop_digests(folder)  # else the changed state.pt is refused by its digest before any load
    torch.save({"optimizer": nn.Linear(2, 2)}, folder / STATE_FILE)  # a whole module, i.e. arbitrary code
    with pytest.raises(CorruptCheckpointError, match="is not a safe state dict"):
        load_checkpoint(folder)


@pytest.mark.parametrize("missing", [STATE_FILE, "model/weights.pt"])
def test_a_folder_missing_a_part_is_refused_naming_the_folder_and_the_part(
    tmp_path: Path, missing: str
) -> None:
    folder = _save(tmp_path / "ckpt", 1)
    (folder / missing).unlink()
    with pytest.raises(
        CheckpointNotFoundError, match=rf"{folder} is not a knet training checkpoint: {missing}"
    ):
        load_checkpoint(folder)


def _drop_digests(folder: Path) -> None:
    """Make ``folder`` look like a checkpoint written before checkpoints carried file digests."""
    raw = json.loads((folder / METADATA_FILE).read_text())
    del raw["sha256"]
    (folder / METADATA_FILE).write_text(json.dumps(raw))


def test_a_state_file_with_4_kb_zeroed_in_the_middle_is_refused_naming_it_and_both_digests(
    tmp_path: Path,
) -> None:
    folder = save_checkpoint(
        tmp_path / "ckpt", _state(epoch=1, model=nn.Linear(256, 256)), write_model=_weights(nn.Linear(4, 2))
    )
    state_path = folder / STATE_FILE
    data = bytearray(state_path.read_bytes())
    middle = len(data) // 2
    data[middle - 2048 : middle + 2048] = bytes(4096)
    state_path.write_bytes(bytes(data))
    recorded = read_checkpoint_metadata(folder).sha256[STATE_FILE]
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(CorruptCheckpointError) as refused:
        load_checkpoint(folder)
    message = str(refused.value)
    assert f"{state_path} is truncated or damaged" in message
    assert recorded in message and actual in message
    assert "Resume from another checkpoint folder" in message


@pytest.mark.parametrize("load", [load_model_weights, require_checkpoint])
def test_a_flipped_byte_in_the_model_weights_is_refused_when_loading_the_weights_or_requiring_the_folder(
    tmp_path: Path, load: object
) -> None:
    folder = _save(tmp_path / "ckpt", 1)
    weights_path = model_dir(folder) / "weights.pt"
    data = bytearray(weights_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights_path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match=rf"{weights_path} is truncated or damaged: its sha256"):
        load(folder)


def test_metadata_lists_the_sha256_of_every_file_of_the_checkpoint(tmp_path: Path) -> None:
    folder = save_checkpoint(tmp_path / "ckpt", _state(epoch=1), write_model=tiny_bundle)
    digests = json.loads((folder / METADATA_FILE).read_text())["sha256"]
    files = sorted(
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file() and path.name != METADATA_FILE
    )
    assert STATE_FILE in files and "model/weights.pt" in files and "model/model_config.json" in files
    assert sorted(digests) == files
    for name, digest in digests.items():
        assert digest == hashlib.sha256((folder / name).read_bytes()).hexdigest(), name
    assert read_checkpoint_metadata(folder).sha256 == digests


def test_a_checkpoint_whose_metadata_has_no_digests_still_loads_unchecked(tmp_path: Path) -> None:
    folder = _save(tmp_path / "ckpt", 3, score=CheckpointScore("val/pq", "max", 10.0))
    _drop_digests(folder)
    assert read_checkpoint_metadata(folder).sha256 is None
    assert load_checkpoint(folder).epoch == 3 and load_model_weights(folder).keys() == {"weight", "bias"}
    assert require_checkpoint(folder) == folder


def test_a_file_listed_in_the_metadata_but_missing_is_refused_naming_it(tmp_path: Path) -> None:
    folder = save_checkpoint(tmp_path / "ckpt", _state(epoch=1), write_model=tiny_bundle)
    (model_dir(folder) / "inference.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="model/inference.json is missing"):
        require_checkpoint(folder)


def test_a_state_file_holding_pickled_objects_is_refused_naming_it_without_torchs_unsafe_advice(
    tmp_path: Path,
) -> None:
    folder = _save(tmp_path / "ckpt", 1)
    _drop_digests(folder)
    state_path = folder / STATE_FILE
    torch.save({"optimizer": nn.Linear(2, 2)}, state_path)
    with pytest.raises(CorruptCheckpointError) as caught:
        load_checkpoint(folder)
    message = str(caught.value)
    assert message.splitlines()[0].startswith(
        f"{state_path} is not a safe state dict (it holds pickled Python objects: "
        "torch.nn.modules.linear.Linear) and was refused; "
    )
    assert "weights_only" not in message and caught.value.__cause__ is None


def test_model_weights_holding_pickled_objects_are_refused_naming_the_file(tmp_path: Path) -> None:
    folder = _save(tmp_path / "ckpt", 1)
    _drop_digests(folder)
    weights_path = folder / "model" / "weights.pt"
    torch.save({"weight": nn.Linear(2, 2)}, weights_path)
    with pytest.raises(CorruptCheckpointError, match=rf"{weights_path} is not a safe state dict"):
        load_model_weights(folder)


def test_predict_with_a_bundle_whose_weights_hold_pickled_objects_is_one_error_line(
    tmp_path: Path, capsys
) -> None:
    from knet_platform.cli import main
    from PIL import Image

    bundle = tiny_bundle(tmp_path / "bundle")
    torch.save({"model": nn.Linear(2, 2)}, bundle / "weights.pt")
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    code = main(["predict", "--model", str(bundle), str(image), "--out", str(tmp_path / "out")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and errors == [
        f"error: {bundle / 'weights.pt'} is not a safe state dict (it holds pickled Python objects: "
        "torch.nn.modules.linear.Linear) and was refused; a bundle's weights are tensors only: write the "
        "bundle with knet.bundle.save_bundle (knet run does)."
    ]

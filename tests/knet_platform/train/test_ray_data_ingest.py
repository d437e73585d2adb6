"""Ray Data ingest of packed shards, on a real local Ray: two Train workers get every row exactly once
per epoch, in an order the seed fixes and the epoch changes; a ``file://`` URI reads like the folder;
``knet run`` on shards registers a model; a corrupted shard ends the run with one line naming it."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import ray
import ray.train
from knet_platform.cli import main
from knet_platform.experiment.schema import Experiment, load_experiment
from knet_platform.ray_runtime import start_ray, stop_ray
from knet_platform.train.ingest import (
    data_config,
    iter_train_batches,
    resume_epoch,
    rows_per_worker,
    train_dataset,
)
from mlflow.tracking import MlflowClient
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from knet.data import pack_dataset, synthesize
from tests.knet_platform.tiny_run import QUICKSTART, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.ray]

EPOCHS = 2


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 synthetic 64x64 images: 32 train rows in 4 shards of 8 (4 row groups each), 8 val rows."""
    root = tmp_path_factory.mktemp("packed")
    data = synthesize(root / "synthetic", num_images=40, seed=2, image_size=(64, 64), val_fraction=0.2)
    pack_dataset(data.source("coco_panoptic", "train"), str(root / "train"), shard_size=8, row_group_mb=0.004)
    pack_dataset(data.source("coco_panoptic", "val"), str(root / "val"))
    return root


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module: 2 CPUs for the Train workers, 2 for Ray Data's tasks."""
    runtime = start_ray(num_cpus=4, include_dashboard=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers run this module's loop
    yield runtime
    stop_ray(runtime)


def experiment(packed: Path, tmp_path: Path, *extra: str) -> Experiment:
    return load_experiment(
        str(QUICKSTART),
        [
            *tiny_overrides(tmp_path, epochs=EPOCHS),
            f"data.train={{format: parquet, shards: {packed / 'train'}}}",
            f"data.val={{format: parquet, shards: {packed / 'val'}}}",
            "data.ingest.shuffle_buffer_rows=6",
            "train.seed=5",
            *extra,
        ],
    )


RUNS = ("first", "again", "resumed")  # two runs from epoch 0, one resumed after epoch 1


def record_rows(config: dict) -> None:
    """A Train worker's loop: per run and epoch, write the row ids and epochs this rank received."""
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    out = Path(config["out"])
    for run in RUNS:
        shard = ray.train.get_dataset_shard(run)
        for epoch in range(EPOCHS):
            rows, epochs = [], []
            for batch, row_ids, row_epochs in iter_train_batches(
                shard, config["experiment"], epoch=epoch, rank=rank, world_size=world
            ):
                assert len(batch) == len(row_ids)
                rows += row_ids.tolist()
                epochs += row_epochs.tolist()
            (out / f"{run}-{epoch}-{rank}.json").write_text(json.dumps({"rows": rows, "epochs": epochs}))
    ray.train.report({"done": 1})


def test_two_workers_get_every_row_once_per_epoch_in_an_order_the_seed_fixes(
    packed: Path, tmp_path: Path, local_ray
) -> None:
    exp = experiment(packed, tmp_path)
    first_epochs = {"first": 0, "again": 0, "resumed": 1}
    TorchTrainer(
        record_rows,
        train_loop_config={"out": str(tmp_path), "experiment": exp},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="rows", storage_path=str(tmp_path / "ray")),
        datasets={run: train_dataset(exp, first_epochs[run]) for run in RUNS},
        dataset_config=data_config(RUNS),
    ).fit()
    got = {
        (run, e, r): json.loads((tmp_path / f"{run}-{e}-{r}.json").read_text())
        for run in RUNS
        for e in range(EPOCHS)
        for r in range(2)
    }
    for epoch in range(EPOCHS):
        ranks = [got["first", epoch, r]["rows"] for r in range(2)]
        assert sorted(ranks[0] + ranks[1]) == list(range(32)), f"epoch {epoch}: a row missing or twice"
        assert len(ranks[0]) == len(ranks[1]) == rows_per_worker(exp, 2) == 16
        assert {e for r in range(2) for e in got["first", epoch, r]["epochs"]} == {epoch}
    assert got["first", 0, 0]["rows"] != got["first", 1, 0]["rows"], "epochs must differ"
    for key, value in got.items():  # the same seed on the same cluster shape gives the same order
        if key[0] == "again":
            assert value == got[("first", *key[1:])]
    for rank in range(2):  # a run resumed after epoch 1 gets epoch 2's rows first (the local shuffle is
        # seeded by the epoch the loop passes, here 0, so only the order within each rank differs)
        assert got["resumed", 0, rank]["epochs"] == [1] * 16
        assert sorted(got["resumed", 0, rank]["rows"]) == sorted(got["first", 1, rank]["rows"])


def test_a_file_uri_reads_the_same_rows_as_the_folder(packed: Path, tmp_path: Path, local_ray) -> None:
    by_folder = experiment(packed, tmp_path)
    by_uri = experiment(
        packed, tmp_path, f"data.train={{format: parquet, shards: 'file://{packed / 'train'}'}}"
    )
    rows = []
    for exp in (by_folder, by_uri):
        dataset = train_dataset(exp, 0)
        dataset.context.execution_options.preserve_order = True  # as data_config() sets it for Train
        rows.append([row["row_index"] for row in dataset.iter_rows()])
    assert rows[0] == rows[1] and sorted(rows[0]) == list(range(32))


def test_resume_epoch_is_the_epoch_of_the_latest_checkpoint_ray_recorded(tmp_path: Path) -> None:
    assert resume_epoch(str(tmp_path), "never-ran") == 0
    (tmp_path / "run").mkdir()
    record = {
        "latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_epoch_0004", "metrics": {"epoch": 4}}
    }
    (tmp_path / "run" / "checkpoint_manager_snapshot.json").write_text(json.dumps(record))
    assert resume_epoch(str(tmp_path), "run") == 4


def test_knet_run_on_packed_shards_registers_its_model(
    packed: Path, tmp_path: Path, local_ray, capsys: pytest.CaptureFixture[str]
) -> None:
    exp_args = _run_args(packed, tmp_path, packed / "train")
    assert main(exp_args) == 0, capsys.readouterr().err[-3000:]
    versions = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_model_versions("name='quickstart'")
    assert len(versions) == 1


def test_a_corrupted_shard_ends_the_run_with_one_line_naming_it(
    packed: Path, tmp_path: Path, local_ray, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(packed / "train", bad)
    shard = bad / "shard-00002.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(_run_args(packed, tmp_path, bad)) == 1
    err = capsys.readouterr().err
    last = [line for line in err.splitlines() if line.strip()][-1]
    assert last.startswith("error: training failed: worker ")
    assert f"DataError: checksum mismatch for Parquet shard {shard}" in last
    assert "restarting the workers" not in err  # a bad file fails the same way every time


def _run_args(packed: Path, tmp_path: Path, train: Path) -> list[str]:
    overrides = [
        *tiny_overrides(tmp_path, epochs=1),
        f"data.train={{format: parquet, shards: {train}}}",
        f"data.val={{format: parquet, shards: {packed / 'val'}}}",
    ]
    return ["run", str(QUICKSTART), *[arg for o in overrides for arg in ("--set", o)]]

"""The knet command: fast help, one-line errors with exit code 2, show-config round trips."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml
from knet_platform.cli import main
from knet_platform.experiment import load_experiment

REPO = Path(__file__).absolute().parents[2]
QUICKSTART = REPO / "experiments" / "quickstart.yaml"


def test_help_is_fast_and_imports_no_heavy_library():
    code = "import sys; from knet_platform.cli import main; print(sorted({'torch', 'ray', 'mlflow'} & set(sys.modules)))"
    started = time.perf_counter()
    help_run = subprocess.run(
        [sys.executable, "-m", "knet_platform.cli", "--help"], capture_output=True, text=True
    )
    elapsed = time.perf_counter() - started
    assert (
        help_run.returncode == 0
        and "show-config" in help_run.stdout
        and "evaluate-results" in help_run.stdout
    )
    assert elapsed < 3.0
    imported = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "[]"


def test_bad_override_prints_one_error_line_and_exits_2(capsys):
    assert main(["show-config", str(QUICKSTART), "--set", "model.chanels=32"]) == 2
    err = capsys.readouterr().err
    assert err == "error: unknown key 'model.chanels': did you mean 'model.channels'?\n"
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_run_with_a_bad_file_fails_before_ray(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICKSTART.read_text().replace("batch_size: 4", "batch_size: 0"))
    assert main(["run", str(bad)]) == 2
    assert capsys.readouterr().err == "error: train.batch_size: must be >= 1\n"
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_checkpoints_off_the_evaluated_epochs_are_refused_before_ray(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sets = ["--set", "train.eval_interval=2", "--set", "train.checkpoint_interval=3"]
    assert main(["run", str(QUICKSTART), *sets]) == 2
    assert "train.checkpoint_interval=3 is not a multiple of train.eval_interval=2" in capsys.readouterr().err
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_missing_experiment_file_is_a_clear_error(tmp_path, capsys):
    assert main(["show-config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_show_config_output_loads_back_to_the_same_experiment(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        main(["show-config", str(QUICKSTART), "--set", "train.lr=3e-4", "--set", "model.num_stages=3"]) == 0
    )
    printed = capsys.readouterr().out
    resolved = yaml.safe_load(printed)
    assert resolved["train"]["lr"] == 3e-4 and resolved["model"]["num_stages"] == 3
    assert resolved["model"]["update"]["num_heads"] == 4  # the resolved model config, not only the YAML keys
    copy = tmp_path / "resolved.yaml"
    copy.write_text(printed)
    again = load_experiment(copy)
    original = load_experiment(QUICKSTART, ["train.lr=3e-4", "model.num_stages=3"])
    assert again.model_config() == original.model_config()
    assert again.to_dict() | {"model": {}} == original.to_dict() | {"model": {}}


def test_data_synth_writes_a_dataset(tmp_path, capsys):
    assert (
        main(["data", "synth", str(tmp_path / "syn"), "--images", "4", "--seed", "1", "--size", "64", "64"])
        == 0
    )
    assert "train" in capsys.readouterr().out
    assert (tmp_path / "syn" / "coco_panoptic" / "train.json").is_file()


def test_data_check_pack_and_check_of_the_shards(tmp_path, capsys):
    synth = tmp_path / "syn"
    assert main(["data", "synth", str(synth), "--images", "4", "--size", "64", "64"]) == 0
    for source in ("coco_panoptic/train.json", "coco_instance/val.json", "semantic/train"):
        assert main(["data", "check", str(synth / source)]) == 0, source
    capsys.readouterr()
    assert main(["data", "pack", str(synth / "coco_panoptic" / "train.json"), str(tmp_path / "shards")]) == 0
    assert "shards" in capsys.readouterr().out
    assert main(["data", "check", str(tmp_path / "shards")]) == 0
    summary = capsys.readouterr().out
    assert summary.startswith("dataset: parquet") and "images: 3" in summary and summary.endswith("OK\n")


def test_data_check_exits_1_on_problems_and_2_on_an_unknown_path(tmp_path, capsys):
    synth = tmp_path / "syn"
    main(["data", "synth", str(synth), "--images", "4", "--size", "64", "64"])
    (synth / "images" / "train" / "000001.png").write_bytes(b"not an image")
    capsys.readouterr()
    assert main(["data", "check", str(synth / "coco_panoptic" / "train.json")]) == 1
    assert capsys.readouterr().out.rstrip().endswith("NOT OK")
    assert main(["data", "check", str(tmp_path / "nothing")]) == 2
    assert "dataset path not found" in capsys.readouterr().err


def test_evaluate_results_prints_the_metrics_as_json(tmp_path, capsys):
    synth = tmp_path / "syn"
    main(["data", "synth", str(synth), "--images", "4", "--size", "64", "64"])
    gt = str(synth / "coco_panoptic" / "val.json")
    capsys.readouterr()
    assert main(["evaluate-results", "panoptic", "--gt", gt, "--pred", gt]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["pq"] == 100.0 and {"sq", "rq", "pq_th", "pq_st"} <= set(metrics)

"""``knet import-weights``: a released K-Net checkpoint becomes a registered model version that
``knet eval`` and ``knet predict`` read by ``models:/NAME@champion``; a checkpoint or class list that
does not fit is one ``error:`` line naming what is wrong.

The checkpoint is written the way the official K-Net saves one (its key names, ``{'meta', 'state_dict'}``),
from a small panoptic model with the synthetic dataset's classes, so the whole path runs in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from knet_platform.cli import main
from mlflow.tracking import MlflowClient

from knet import KNetConfig, build_model
from knet.data import synthesize
from knet.weights import to_reference
from tests.knet_platform.tiny_run import BIN, QUICKSTART

pytestmark = pytest.mark.mlflow


def small_checkpoint(
    path: Path, *, rename: dict[str, str] | None = None, task: str = "panoptic"
) -> KNetConfig:
    """A panoptic K-Net for the synthetic classes (3 things + 2 stuff), saved as the official code saves
    its checkpoints; ``rename``: reference keys to write under another name."""
    config = KNetConfig.for_task(
        task,
        num_thing_classes=3,
        num_stuff_classes=2 if task == "panoptic" else 0,
        backbone="resnet18",
        channels=32,
        num_proposals=4,
        num_stages=1,
        update={"feedforward_channels": 64},
    )
    torch.manual_seed(0)
    state = to_reference(build_model(config).state_dict(), config, "official-knet")
    for old, new in (rename or {}).items():
        state[new] = state.pop(old)
    torch.save({"meta": {"epoch": 12}, "state_dict": state}, path)
    return config


def user_env(tmp_path: Path) -> dict[str, str]:
    """What a user's shell has: a PATH with the venv's commands, a HOME and the documented KNET_HOME."""
    return {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": os.environ["HOME"], "KNET_HOME": str(tmp_path / "home")}


def knet(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "knet"), *args],
        cwd=tmp_path,
        env=user_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )


def eval_experiment(tmp_path: Path) -> Path:
    """The quickstart experiment reading the synthetic dataset written under ``tmp_path/data``."""
    data = tmp_path / "data"
    synthesize(data, num_images=4, seed=0, image_size=(64, 64))
    experiment = yaml.safe_load(QUICKSTART.read_text())
    experiment["data"] = {
        split: {
            "format": "coco_panoptic",
            "images": str(data / "images" / split),
            "annotations": str(data / "coco_panoptic" / f"{split}.json"),
            "masks": str(data / "coco_panoptic" / split),
        }
        for split in ("train", "val")
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(experiment))
    return path


@pytest.mark.slow
def test_an_imported_checkpoint_is_registered_and_evaluated_and_predicts(tmp_path):
    experiment = eval_experiment(tmp_path)
    small_checkpoint(tmp_path / "knet.pth")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    classes = tmp_path / "data" / "coco_panoptic" / "val.json"  # a COCO categories list in the file

    imported = knet(
        tmp_path, "import-weights", "knet.pth", "--format", "official-knet", "--task", "panoptic",
        "--name", "shapes-knet", "--classes", str(classes), "--tracking-uri", store,
    )  # fmt: skip

    assert imported.returncode == 0, imported.stderr[-3000:]
    assert "registered models:/shapes-knet/1; models:/shapes-knet@champion: yes" in imported.stdout
    evaluated = knet(
        tmp_path, "eval", "--model", "models:/shapes-knet@champion", "--tracking-uri", store, str(experiment)
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads(evaluated.stdout[evaluated.stdout.index("{") :])
    assert "val/pq" in metrics
    predicted = knet(
        tmp_path, "predict", "--model", "models:/shapes-knet@champion", "--tracking-uri", store,
        str(tmp_path / "data" / "images" / "val"), "--out", str(tmp_path / "predictions"),
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert any((tmp_path / "predictions").iterdir())
    version = MlflowClient(tracking_uri=store).get_model_version("shapes-knet", "1")
    assert version.tags["knet.import_format"] == "official-knet"
    assert version.tags["knet.imported_from"] == str(tmp_path / "knet.pth")
    assert len(version.tags["knet.import_sha256"]) == 64


def class_file(tmp_path: Path) -> Path:
    """A class list for the small checkpoint: a bare COCO categories list, 3 things + 2 stuff."""
    things = [{"id": i, "name": f"thing{i}", "isthing": 1} for i in (1, 2, 3)]
    stuff = [{"id": 9, "name": "sky", "isthing": 0}, {"id": 8, "name": "sea", "isthing": 0}]
    path = tmp_path / "classes.json"
    path.write_text(json.dumps(things + stuff))
    return path


def _run(tmp_path: Path, capsys, *args: str) -> tuple[int, str, list[str]]:
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(["import-weights", *args, "--tracking-uri", store])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def test_a_second_import_does_not_take_the_champion_alias(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KNET_HOME", str(tmp_path / "home"))
    small_checkpoint(tmp_path / "knet.pth")
    classes = class_file(tmp_path)
    args = [
        str(tmp_path / "knet.pth"),
        "--format",
        "official-knet",
        "--task",
        "panoptic",
        "--name",
        "m",
        "--classes",
        str(classes),
    ]
    assert _run(tmp_path, capsys, *args)[0] == 0
    code, out, _ = _run(tmp_path, capsys, *args)
    assert code == 0 and "registered models:/m/2; models:/m@champion: no (version 1 holds 'champion'" in out
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert str(MlflowClient(tracking_uri=store).get_model_version_by_alias("m", "champion").version) == "1"


def test_a_checkpoint_that_does_not_fit_is_one_error_line_naming_the_key(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KNET_HOME", str(tmp_path / "home"))
    small_checkpoint(tmp_path / "bad.pth", rename={"rpn_head.conv_seg.bias": "rpn_head.conv_seg.b"})
    code, _, err = _run(
        tmp_path, capsys, str(tmp_path / "bad.pth"), "--format", "official-knet", "--task", "panoptic",
        "--name", "m", "--classes", str(class_file(tmp_path)),
    )  # fmt: skip
    assert code == 2 and len(err) == 1
    assert "1 unmapped: rpn_head.conv_seg.b" in err[0] and "1 missing: rpn_head.conv_seg.bias" in err[0]
    assert not (tmp_path / "mlflow.db").exists()  # refused before anything was registered


def test_a_class_list_of_another_size_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KNET_HOME", str(tmp_path / "home"))
    small_checkpoint(tmp_path / "knet.pth")  # 3 things + 2 stuff
    classes = tmp_path / "classes.json"
    classes.write_text(
        json.dumps({"categories": [{"id": i, "name": str(i), "isthing": int(i < 4)} for i in (1, 2, 3, 4)]})
    )
    args = [str(tmp_path / "knet.pth"), "--format", "official-knet", "--task", "panoptic", "--name", "m"]
    code, _, err = _run(tmp_path, capsys, *args, "--classes", str(classes))
    assert code == 2 and len(err) == 1
    assert "has 3 thing + 2 stuff classes but --classes" in err[0] and "lists 3 + 1" in err[0]
    code, _, err = _run(tmp_path, capsys, *args, "--classes", "coco")
    assert (
        code == 2
        and len(err) == 1
        and "num_thing_classes=80" in err[0]
        and "checkpoint's 5 classes" in err[0]
    )
    code, _, err = _run(tmp_path, capsys, *args, "--classes", "ade20k")
    assert code == 2 and "--classes ade20k is the semantic models' list" in err[0]
    code, _, err = _run(tmp_path, capsys, *args[:-1], "a/b", "--classes", "coco")
    assert code == 2 and "a model name must be non-empty without '/'" in err[0]
    small_checkpoint(tmp_path / "instance.pth", task="instance")
    code, _, err = _run(
        tmp_path, capsys, str(tmp_path / "instance.pth"), *args[1:], "--classes", str(class_file(tmp_path))
    )
    assert code == 2 and "no stuff rows: is it an instance checkpoint (--task instance)?" in err[0]


def test_an_imported_mmseg_checkpoint_is_evaluated_on_a_semantic_dataset(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KNET_HOME", str(tmp_path / "home"))
    data = tmp_path / "data"
    synthesize(data, num_images=4, seed=0, image_size=(64, 64))
    config = KNetConfig.for_task(
        "semantic", num_thing_classes=0, num_stuff_classes=5, backbone="resnet18", decode_head="fcn",
        channels=32, num_stages=1, update={"feedforward_channels": 64},
    )  # fmt: skip
    torch.manual_seed(0)
    state = to_reference(build_model(config).state_dict(), config, "mmseg-knet")
    torch.save({"meta": {}, "state_dict": state}, tmp_path / "seg.pth")
    classes = data / "semantic" / "categories.json"
    args = [str(tmp_path / "seg.pth"), "--format", "mmseg-knet", "--task", "semantic", "--name", "seg"]
    code, out, err = _run(tmp_path, capsys, *args, "--classes", str(classes))
    assert code == 0, err
    assert "imported a semantic K-Net (resnet18, 1 stage, fcn head, 32 channels, 5 classes)" in out
    experiment = yaml.safe_load(QUICKSTART.read_text())
    experiment["task"] = "semantic"
    experiment["train"]["metric"] = "val/miou"
    experiment["model"] = {"backbone": {"name": "resnet18"}, "decode_head": "fcn"}
    experiment["data"] = {
        split: {
            "format": "semantic",
            "images": str(data / "images" / split),
            "masks": str(data / "semantic" / split),
            "annotations": str(classes),
            "reduce_zero_label": True,
        }
        for split in ("train", "val")
    }
    (tmp_path / "seg.yaml").write_text(yaml.safe_dump(experiment))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = main(
        ["eval", "--model", "models:/seg@champion", "--tracking-uri", store, str(tmp_path / "seg.yaml")]
    )
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, captured.err
    assert "val/miou" in json.loads(out[out.index("{") :])

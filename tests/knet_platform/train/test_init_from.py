"""``model.init_from``: a run starts from a registered model trained on other classes (an imported COCO one). The class-specific
layers start afresh (one printed line per group), the rest is loaded, and a model that does not fit, an
unknown URI or ``--from-checkpoint`` beside it is one error line before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from knet_platform.cli import main
from knet_platform.experiment.building import ExperimentError
from knet_platform.experiment.schema import Experiment, load_experiment
from knet_platform.knet_adapter import KNetConfig
from mlflow.tracking import MlflowClient

from knet import build_model
from knet.bundle import save_bundle
from knet.data import Category, CategoryTable, TransformConfig
from knet.weights import to_reference
from tests.knet_platform.test_cli import assert_one_error_line, knet_run
from tests.knet_platform.tiny_run import QUICKSTART, REPO, tiny_overrides

# a source trained on 8 things and 4 stuff classes; the synthetic data has 3 things and 2 stuff
SOURCE_CLASSES = CategoryTable(
    [Category(i + 1, f"thing{i}", True) for i in range(8)]
    + [Category(i + 100, f"stuff{i}", False) for i in range(4)]
)
SMALL_DATA = ["data.synthetic.num_images=16", "train.log_every=0"]


def tiny_args(tmp_path: Path, *extra: str, epochs: int = 1) -> list[str]:
    overrides = [*tiny_overrides(tmp_path, epochs=epochs, workers=1), *SMALL_DATA, *extra]
    return [str(QUICKSTART), *(arg for value in overrides for arg in ("--set", value))]


def tiny_experiment(tmp_path: Path, *extra: str) -> Experiment:
    return load_experiment(str(QUICKSTART), [*tiny_overrides(tmp_path, workers=1), *SMALL_DATA, *extra])


def write_source_bundle(tmp_path: Path, *extra: str) -> Path:
    """A bundle of the tiny experiment's model (with ``extra`` model overrides) for SOURCE_CLASSES."""
    config = tiny_experiment(tmp_path, *extra).model_config()
    config = KNetConfig.from_dict({**config.to_dict(), "num_thing_classes": 8, "num_stuff_classes": 4})
    torch.manual_seed(3)
    return save_bundle(tmp_path / "source", build_model(config), config, SOURCE_CLASSES, TransformConfig())


def write_official_checkpoint(tmp_path: Path) -> Path:
    """The tiny experiment's network with COCO's 80 thing + 53 stuff classes, saved as the official K-Net
    saves its checkpoints (its key names, ``{'meta', 'state_dict'}``)."""
    config = tiny_experiment(tmp_path).model_config()
    config = KNetConfig.from_dict({**config.to_dict(), "num_thing_classes": 80, "num_stuff_classes": 53})
    torch.manual_seed(3)
    state = to_reference(build_model(config).state_dict(), config, "official-knet")
    torch.save({"meta": {"epoch": 36}, "state_dict": state}, tmp_path / "knet_coco.pth")
    return tmp_path / "knet_coco.pth"


def test_init_from_is_a_validated_model_key_that_show_config_prints(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "source").mkdir()
    assert main(["show-config", str(QUICKSTART), "--set", "model.init_from=models:/coco-like@champion"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["init_from"] == "models:/coco-like@champion"
    written = yaml.safe_load(QUICKSTART.read_text())
    written["model"]["init_fron"] = "source"
    with pytest.raises(
        ExperimentError, match=r"model.init_fron: is unknown; did you mean 'model.init_from'\?"
    ):
        Experiment.from_dict(written, base_dir=tmp_path)
    del written["model"]["init_fron"]
    written["model"]["init_from"] = "source"  # a folder, relative to the YAML's
    assert Experiment.from_dict(written, base_dir=tmp_path).model.init_from == str(tmp_path / "source")
    written["model"]["init_from"] = "missing"
    with pytest.raises(ExperimentError, match="model.init_from: .*missing is not a folder"):
        Experiment.from_dict(written, base_dir=tmp_path)
    tune = load_experiment(REPO / "experiments" / "tune_quickstart.yaml").to_dict()
    tune["model"]["init_from"] = "models:/coco-like@champion"
    with pytest.raises(ExperimentError, match="model.init_from: a search starts every trial from scratch"):
        Experiment.from_dict(tune)


def test_a_model_of_another_width_is_refused_before_ray_naming_the_keys(tmp_path: Path) -> None:
    source = write_source_bundle(tmp_path, "model.channels=64")
    run = knet_run(tmp_path, *tiny_args(tmp_path, f"model.init_from={source}"))
    line = assert_one_error_line(run, "model.init_from: the weights do not fit the model;", alone=False)
    assert (
        "of another shape: neck.lateral_convs.0.weight [64, 64, 1, 1] (the model needs [32, 64, 1, 1])"
        in line
    )
    assert "channels=64 (here 32)" in line and not run.ray_started


def test_an_unknown_model_uri_is_refused_before_ray(tmp_path: Path) -> None:
    run = knet_run(tmp_path, *tiny_args(tmp_path, "model.init_from=models:/nothing@champion"))
    assert_one_error_line(run, "model.init_from: models:/nothing@champion: ", alone=False)
    assert not run.ray_started


def test_init_from_and_from_checkpoint_together_are_refused_before_ray(tmp_path: Path) -> None:
    source = write_source_bundle(tmp_path)
    run = knet_run(
        tmp_path, *tiny_args(tmp_path, f"model.init_from={source}"), "--from-checkpoint", str(source)
    )
    assert_one_error_line(run, "model.init_from starts a new model from another one's weights", alone=False)
    assert not run.ray_started


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.mlflow
def test_an_imported_coco_model_fine_tuned_on_other_classes_reinitialises_the_class_layers_and_learns(
    tmp_path: Path,
) -> None:
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    imported = ["import-weights", str(write_official_checkpoint(tmp_path)), "--format", "official-knet"]
    imported += ["--task", "panoptic", "--name", "knet-coco", "--tracking-uri", tracking_uri]
    assert main(imported) == 0
    source = "models:/knet-coco@champion"
    run = knet_run(
        tmp_path,
        *tiny_args(tmp_path, f"model.init_from={source}", "train.max_steps_per_epoch=4", epochs=3),
    )
    assert run.code == 0, run.err[-3000:]
    printed = run.out + run.err
    assert (
        "init_from: re-initialised kernel_head.conv_seg (dense classifier and stuff kernels: 133 -> 5 classes)"
        in printed
    )
    assert "init_from: re-initialised stages.*.fc_cls (class FCs: 133 -> 5 classes)" in printed
    assert "init_from: loaded 212 tensors" in printed  # every other tensor of the imported model
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    (version,) = client.search_model_versions("name='quickstart'")  # the fine-tuned model, registered
    losses = sorted(client.get_metric_history(version.run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in losses] == [1, 2, 3] and losses[-1].value < losses[0].value, losses
    assert client.get_run(version.run_id).data.params["model.init_from"] == source

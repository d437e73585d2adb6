"""The experiment schema: every bad file or override fails with one clear ExperimentError.

``load_experiment`` never touches Ray or MLflow, so these tests need no "no Ray started" check; the
command-line path, where a late check could start Ray first, is checked in test_cli.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from knet_platform.experiment.schema import Experiment, ExperimentError, flatten_params, load_experiment

REPO = Path(__file__).absolute().parents[3]
EXPERIMENTS = REPO / "experiments"


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = """
name: t
task: panoptic
model: {backbone: {name: resnet18}, channels: 32, num_proposals: 8}
data:
  synthetic: {num_images: 8, cache_dir: CACHE}
  train: {format: coco_panoptic, images: "{synthetic}/images/train", annotations: "{synthetic}/p/train.json", masks: "{synthetic}/p/train"}
  val: {format: coco_panoptic, images: "{synthetic}/images/val", annotations: "{synthetic}/p/val.json", masks: "{synthetic}/p/val"}
train: {epochs: 2, batch_size: 2}
"""


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return write(tmp_path, BASE.replace("CACHE", str(tmp_path / "cache")))


def assert_fails(path: Path, pattern: str, overrides: list[str] = ()) -> None:
    with pytest.raises(ExperimentError, match=pattern):
        load_experiment(path, list(overrides))


def test_unknown_key_names_dotted_path_and_suggestion(tmp_path, base):
    assert_fails(
        write(tmp_path, base.read_text().replace("epochs:", "epoch:")), r"'train\.epoch'.*'train\.epochs'"
    )


def test_unknown_model_key_is_reported_with_its_dotted_path(tmp_path, base):
    assert_fails(
        base,
        r"unknown key 'model\.update\.feedforward_chanels'.*feedforward_channels",
        ["model.update.feedforward_chanels=64"],
    )


def test_wrong_type_names_key_expected_type_and_value(base):
    assert_fails(base, r"train\.batch_size: must be an integer, got 'two'", ["train.batch_size=two"])
    assert_fails(base, r"scaling\.use_gpu: must be a bool \(true or false\), got 3", ["scaling.use_gpu=3"])


def test_wrong_model_type_names_the_model_key_and_expected_type(tmp_path, base):
    text = base.read_text().replace("num_proposals: 8", "num_proposals: x")
    assert_fails(write(tmp_path, text, "bad.yaml"), r"model\.num_proposals: must be an integer, got 'x'")
    assert_fails(base, r"model\.update\.dropout: must be a float, got None", ["model.update.dropout=null"])


def test_impossible_values_are_refused(base):
    assert_fails(base, r"train\.batch_size: must be >= 1", ["train.batch_size=0"])
    assert_fails(base, r"train\.keep_checkpoints: must be >= 1", ["train.keep_checkpoints=0"])
    assert_fails(
        base,
        r"data\.train\.format.*does not fit task 'instance'",
        ["task=instance", "train.metric=val/mask_ap"],
    )
    assert_fails(
        base,
        r"train\.metric: 'val/miou' is not reported for task 'instance'",
        ["train.metric=val/miou", "task=instance"],
    )
    assert_fails(base, r"model: .*channels must be a positive multiple of 32", ["model.channels=48"])


def test_scaling_combinations_ray_would_refuse_after_starting_are_refused_here(base):
    assert_fails(
        base,
        r"scaling\.resources_per_worker: asks for GPU: 1\.0 per worker but scaling\.use_gpu is false",
        ["scaling.resources_per_worker={CPU: 1, GPU: 1}"],
    )
    assert_fails(
        base,
        r"scaling\.resources_per_worker: GPU: 0 but scaling\.use_gpu is true",
        ["scaling.use_gpu=true", "scaling.resources_per_worker={CPU: 1, GPU: 0}"],
    )
    assert_fails(
        base, r"scaling\.resources_per_worker: .* reserves nothing", ["scaling.resources_per_worker={CPU: 0}"]
    )
    assert_fails(
        base,
        r"scaling\.wait_for_resources: must be a bool \(true or false\)",
        ["scaling.wait_for_resources=1"],
    )
    assert load_experiment(base).scaling.wait_for_resources is False  # refuse by default
    gpu = load_experiment(base, ["scaling.use_gpu=true", "scaling.resources_per_worker={CPU: 2}"])
    assert gpu.scaling.resources_per_worker == {"CPU": 2.0}  # Ray adds GPU: 1 per worker itself


def test_dot_knet_paths_live_under_knet_home(tmp_path, base, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = base.read_text().replace(str(tmp_path / "cache"), ".knet/data/synth")
    path = write(tmp_path, text, "home.yaml")
    overrides = ["tracking.storage_path=.knet/results", "tracking.artifact_location=arts"]
    monkeypatch.delenv("KNET_HOME", raising=False)
    default = load_experiment(path, overrides)
    assert default.data.synthetic.cache_dir == str(tmp_path / ".knet" / "data" / "synth")
    assert default.tracking.storage_path == str(tmp_path / ".knet" / "results")
    monkeypatch.setenv("KNET_HOME", str(tmp_path / "home"))
    moved = load_experiment(path, overrides)
    assert moved.data.synthetic.cache_dir == str(tmp_path / "home" / "data" / "synth")
    assert moved.data.train.images == str(tmp_path / "home" / "data" / "synth" / "images" / "train")
    assert moved.tracking.storage_path == str(tmp_path / "home" / "results")
    assert moved.tracking.artifact_location == str(tmp_path / "arts")  # other relative paths: the cwd


def test_missing_data_path_is_resolved_against_the_yaml_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    text = """
name: t
task: instance
data:
  train: {format: coco_instance, images: imgs, annotations: ann/train.json}
train: {epochs: 1, batch_size: 1, metric: train/loss}
"""
    missing = str(tmp_path / "ann" / "train.json")
    assert_fails(write(tmp_path, text), rf"data\.train\.annotations: {missing} does not exist")
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "train.json").write_text("{}")
    experiment = load_experiment(write(tmp_path, text))
    assert experiment.data.train.images == str(tmp_path / "imgs")


def test_missing_backbone_weights_file_is_refused(base):
    assert_fails(
        base,
        r"model\.backbone\.pretrained_path: /nope/r18\.pth does not exist",
        ["model.backbone.pretrained_path=/nope/r18.pth"],
    )


def test_bad_override_syntax_and_yaml_are_clear(base):
    assert_fails(base, r"bad override 'train\.lr'", ["train.lr"])
    assert_fails(base, r"bad override 'train\.lr=\[1,': the value is not valid YAML", ["train.lr=[1,"])
    assert_fails(base, r"cannot set 'train\.epochs\.x': 'train\.epochs' is 2", ["train.epochs.x=1"])
    assert_fails(base, r"train\.lr: must be a float, got \{'x': 1\}", ["train.lr.x=1"])


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{logunifrm: [1.0e-5, 1.0e-3]}", r"unknown operator 'logunifrm': did you mean 'loguniform'"),
        ("{normal: [0, 1]}", r"unknown operator 'normal'"),
        ("{choice: []}", r"choice takes a non-empty list, got \[\]"),
        ("{uniform: 0.5}", r"uniform takes a non-empty list, got 0\.5"),
        ("{choice: [1], grid: [2]}", r"write one operator, e\.g\. \{choice: \[50, 100\]\}"),
        ("[1, 2]", r"must be a mapping \(one operator"),
    ],
)
def test_a_tune_space_entry_must_be_one_known_operator_with_a_non_empty_list(tmp_path, base, entry, message):
    # only the shape is the schema's; what the values must be is knet_platform.tune.validation's
    text = base.read_text() + f"tune:\n  space:\n    train.lr: {entry}\n"
    assert_fails(write(tmp_path, text), rf"tune\.space\.train\.lr: {message}")


def test_overrides_apply_are_parsed_as_yaml_and_revalidate(base):
    experiment = load_experiment(
        base, ["train.lr=2e-4", "data.transforms.crop_size=null", "model.num_stages=2"]
    )
    assert experiment.train.lr == pytest.approx(2e-4)
    assert experiment.data.transforms.crop_size is None
    assert experiment.model_config().num_stages == 2
    changed = experiment.with_overrides({"train.lr_steps": [1], "scaling.num_workers": 1})
    assert changed.train.lr_steps == [1] and changed.scaling.num_workers == 1
    assert experiment.scaling.num_workers == 2  # the original is untouched
    with pytest.raises(ExperimentError, match="scaling.num_workers: must be >= 1"):
        experiment.with_overrides({"scaling.num_workers": 0})


def test_exponent_numbers_without_a_dot_are_floats_in_files_and_overrides(tmp_path, base):
    # PyYAML alone (YAML 1.1) would read 1e-4 as the string '1e-4'
    text = base.read_text().replace("num_proposals: 8", "num_proposals: 8, loss: {cls_weight: 2e0}")
    text = text.replace("batch_size: 2}", "batch_size: 2, lr: 1e-4}")
    experiment = load_experiment(write(tmp_path, text, "exp.yaml"), ["model.loss.dice_weight=4E+0"])
    assert experiment.train.lr == 1e-4
    model = experiment.model_config()
    assert (model.loss.cls_weight, model.loss.dice_weight) == (2.0, 4.0)


def test_to_dict_round_trips_through_yaml(tmp_path, base):
    experiment = load_experiment(base)
    dumped = yaml.safe_dump(experiment.to_dict(), sort_keys=False)
    again = Experiment.from_dict(yaml.safe_load(dumped))
    assert again == experiment
    assert again.data.train.images == str(tmp_path / "cache" / "images" / "train")


def test_model_config_takes_class_counts_from_categories(base):
    from knet.data import Category, CategoryTable

    table = CategoryTable([Category(1, "a", True), Category(2, "b", True), Category(3, "c", False)])
    config = load_experiment(base).model_config(table)
    assert (config.task, config.num_thing_classes, config.num_stuff_classes, config.channels) == (
        "panoptic",
        2,
        1,
        32,
    )
    with pytest.raises(ExperimentError, match="model.num_thing_classes=5 but the dataset has 2"):
        load_experiment(base, ["model.num_thing_classes=5"]).model_config(table)


def test_flatten_params_masks_secrets():
    experiment = Experiment.from_dict(
        {
            "name": "t",
            "task": "panoptic",
            "data": {"train": {"format": "parquet", "shards": "s3://bucket/shards"}},
            "train": {"metric": "train/loss"},
            "tracking": {"uri": "https://alice:hunter2@mlflow.example.com", "storage_path": "s3://b/ray"},
        }
    )
    params = flatten_params(experiment)
    assert params["tracking.uri"] == "https://***@mlflow.example.com"
    assert params["train.lr"] == "0.0001"
    assert params["data.train.shards"] == "s3://bucket/shards"
    assert "hunter2" not in "".join(params.values())
    params = flatten_params(
        experiment.with_overrides({"scaling.resources_per_worker": {"CPU": 1, "api_token": 3}})
    )
    assert params["scaling.resources_per_worker.api_token"] == "***"
    tokens = experiment.with_overrides(
        {"tracking.uri": "https://mlflow.example.com/?token=abc123&project=seg&password=p4ss&access_key=AK1"}
    )
    params = flatten_params(tokens)
    assert params["tracking.uri"] == (
        "https://mlflow.example.com/?token=***&project=seg&password=***&access_key=***"
    )
    assert not {"abc123", "p4ss", "AK1"} & set("".join(params.values()).replace("&", " ").split())


# The paper's recipes (knet-spec.md sections 1 and 3): AdamW, 1000 warm-up iterations from 0.001x, grad
# clip 1.0, 3 update stages, 8 GPU workers x 2 images = 16 images per iteration.
_COCO_1X = {
    "lr": 1e-4, "weight_decay": 0.05, "backbone_lr_mult": 0.25, "lr_steps": [8, 11], "epochs": 12,
    "num_proposals": 100, "train_short_sides": [800], "train_short_range": None, "max_size": 1333,
    "crop_size": None, "test": (800, 1333), "frozen_stages": 1, "norm_eval": True,
}  # fmt: skip
PAPER_SETTINGS = {
    "coco_panoptic_r50": _COCO_1X,
    "coco_instance_r50": _COCO_1X,
    # 80k iterations x 16 images over ADE20K's 20,210 images ~ 64 epochs, steps at 60k / 72k ~ 48 / 57;
    # resize (2048, 512) x ratio 0.5-2.0 -> short side 256-1024, long side up to 4096, 512 x 512 crops
    "ade20k_semantic_upernet_r50": {
        "lr": 1e-4, "weight_decay": 5e-4, "backbone_lr_mult": 1.0, "lr_steps": [48, 57], "epochs": 64,
        "num_proposals": None, "train_short_sides": None, "train_short_range": (256, 1024),
        "max_size": 4096, "crop_size": (512, 512), "test": (512, 2048), "frozen_stages": -1,
        "norm_eval": False,
    },
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(path.stem for path in EXPERIMENTS.glob("*.yaml")))
def test_shipped_experiments_load_and_validate(name, tmp_path, monkeypatch):
    text = (EXPERIMENTS / f"{name}.yaml").read_text()
    raw = yaml.safe_load(text)
    synthetic = "synthetic" in raw["data"]
    if not synthetic:  # the real datasets are not here: point their paths at empty stand-ins
        for split in ("train", "val"):
            for key in ("images", "annotations", "masks"):
                if raw["data"][split].get(key):
                    stand_in = tmp_path / split / key
                    stand_in.mkdir(parents=True, exist_ok=True)
                    raw["data"][split][key] = str(stand_in)
        weights = tmp_path / "resnet50.pth"
        weights.write_bytes(b"")
        raw["model"]["backbone"]["pretrained_path"] = str(weights)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KNET_HOME", raising=False)
    experiment = Experiment.from_dict(raw)
    assert experiment.name == name and experiment.model_config().task == experiment.task
    if synthetic:
        assert experiment.data.synthetic.cache_dir == str(tmp_path / ".knet" / "data" / "synthetic")
        return
    paper = PAPER_SETTINGS[name]
    train, config, transforms = experiment.train, experiment.model_config(), experiment.data.transforms
    assert (train.lr, train.weight_decay, train.backbone_lr_mult) == pytest.approx(
        (paper["lr"], paper["weight_decay"], paper["backbone_lr_mult"])
    )
    assert (train.lr_steps, train.lr_gamma, train.epochs) == (paper["lr_steps"], 0.1, paper["epochs"])
    assert (train.warmup_iters, train.warmup_ratio, train.grad_clip) == (1000, 0.001, 1.0)
    assert train.betas == [0.9, 0.999] and train.amp is False  # the paper trains in fp32
    assert (train.batch_size, experiment.scaling.num_workers, experiment.scaling.use_gpu) == (2, 8, True)
    assert config.num_stages == 3
    if paper["num_proposals"] is not None:  # semantic: one kernel per class, no proposals
        assert config.num_proposals == paper["num_proposals"]
    assert (config.backbone.frozen_stages, config.backbone.norm_eval) == (
        paper["frozen_stages"],
        paper["norm_eval"],
    )
    assert transforms.train_short_sides == paper["train_short_sides"]
    assert transforms.train_short_range == paper["train_short_range"]
    assert (transforms.max_size, transforms.crop_size, transforms.flip_prob) == (
        paper["max_size"],
        paper["crop_size"],
        0.5,
    )
    assert (transforms.test_short_side, transforms.test_max_size) == paper["test"]


# ---- the model section ------------------------------------------------------------------------------


def test_the_model_section_is_built_once_with_the_experiment_and_filled_with_the_datas_class_counts(
    tmp_path: Path,
) -> None:
    from knet.data import Category, CategoryTable

    experiment = Experiment.from_dict(
        {
            "name": "x",
            "task": "instance",
            "model": {"num_proposals": 30},
            "data": _synthetic_data(tmp_path),
            **_BY_LOSS,
        },
    )
    built = experiment.model.config
    assert built is not None and built.num_proposals == 30
    assert experiment.model_config() is built  # not rebuilt on every use
    table = CategoryTable([Category(1, "a", True), Category(2, "b", True), Category(3, "c", True)])
    filled = experiment.model_config(table)
    assert (filled.num_thing_classes, filled.num_stuff_classes, filled.num_proposals) == (3, 0, 30)
    assert Experiment.from_dict(experiment.to_dict()) == experiment  # the section round-trips as written
    assert experiment.to_dict()["model"] == {"num_proposals": 30}


def test_a_class_count_written_in_the_yaml_must_match_the_dataset(tmp_path: Path) -> None:
    from knet.data import Category, CategoryTable

    experiment = Experiment.from_dict(
        {
            "name": "x",
            "task": "instance",
            "model": {"num_thing_classes": 5},
            "data": _synthetic_data(tmp_path),
            **_BY_LOSS,
        },
    )
    with pytest.raises(ExperimentError, match="model.num_thing_classes=5 but the dataset has 1"):
        experiment.model_config(CategoryTable([Category(1, "a", True)]))


def test_a_trials_experiment_reaches_the_workers_without_its_tune_section(tmp_path: Path) -> None:
    experiment = Experiment.from_dict(
        {
            "name": "x",
            "task": "instance",
            "data": _synthetic_data(tmp_path),
            **_BY_LOSS,
            "tune": {"space": {"train.lr": {"choice": [1e-4, 2e-4]}}},
        }  # fmt: skip
    )
    alone = experiment.without_tune()
    assert alone.tune is None and experiment.tune is not None
    assert alone.model.config is experiment.model.config


_BY_LOSS = {"train": {"metric": "train/loss", "mode": "min"}}  # no val split needed


def _synthetic_data(tmp_path: Path) -> dict:
    cache = tmp_path / "syn"
    return {
        "synthetic": {"cache_dir": str(cache)},
        "train": {"format": "coco_instance", "images": f"{cache}/images/train",
                  "annotations": f"{cache}/annotations/instances_train.json"},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("text", "location", "cause"),
    [
        ("name: t\ntask: panoptic: x\n", "2:15", "mapping values are not allowed here"),
        ("name: t\nmodel: {channels: 32\ndata: {}\n", "3:5", "expected ',' or '}'"),
        ("name: 'unterminated\n", "2:1", "found unexpected end of stream"),
    ],
)
def test_a_yaml_syntax_error_names_file_line_and_column_on_the_cli(
    tmp_path: Path, capsys, text: str, location: str, cause: str
) -> None:
    from knet_platform.cli import main

    path = write(tmp_path, text)
    assert main(["show-config", str(path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"error: {path}:{location}: "), errors
    assert cause in errors[0] and "fix the syntax" in errors[0]


@pytest.mark.parametrize("text", ["", "# only a comment\n\n# another\n"])
def test_an_empty_experiment_file_says_it_is_empty(tmp_path: Path, capsys, text: str) -> None:
    from knet_platform.cli import main

    path = write(tmp_path, text)
    assert main(["show-config", str(path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert errors == [f"error: {path} is empty (or holds only comments): write the experiment in it "
                      "(name, task, model, data, ...; see experiments/ for examples)"]  # fmt: skip


def test_a_bad_set_value_names_its_column_and_cause_on_the_cli(capsys) -> None:
    from knet_platform.cli import main

    experiment = str(EXPERIMENTS / "quickstart.yaml")
    assert main(["show-config", experiment, "--set", "train.lr=[1e-4,"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1, errors
    assert errors[0].startswith(
        "error: bad override 'train.lr=[1e-4,': the value is not valid YAML at column 7"
    )
    assert "expected the node content" in errors[0] and "quote it" in errors[0]

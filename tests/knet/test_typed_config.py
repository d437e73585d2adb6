"""knet.typed_config: one strict loader for every dataclass config, one error naming the dotted key."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

from knet.typed_config import ConfigFieldError, build, check_field_types, conform, plain, plain_fields


@dataclass
class Point:
    """A type that parses its own mapping (as DataSource does)."""

    YAML_FORM = "{x: <int>, y: <int>}"
    x: int
    y: int

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Point:
        if set(data) != {"x", "y"}:
            raise ValueError(f"Point needs exactly x and y, got {sorted(data)}")
        return build(cls, data, label="Point")

    def to_dict(self) -> dict[str, Any]:
        return {"x": self.x, "y": self.y}


@dataclass
class Optimizer:
    lr: float = 0.1
    lr_steps: list[int] = field(default_factory=lambda: [8, 11])
    kind: Literal["sgd", "adamw"] = "sgd"


@dataclass
class Experiment:
    name: str
    epochs: int = 12
    resume: bool = False
    crop: tuple[int, int] | None = None
    origin: Point | None = None
    resources: dict[str, float] = field(default_factory=dict)
    train: Optimizer = field(default_factory=Optimizer)
    notes: Any = None


def fails(data: Any, prefix: str = "") -> ConfigFieldError:
    with pytest.raises(ConfigFieldError) as caught:
        build(Experiment, data, prefix)
    return caught.value


def test_a_valid_mapping_builds_nested_dataclasses_and_converts_containers() -> None:
    built = build(
        Experiment,
        {"name": "a", "crop": [32, 48], "origin": {"x": 1, "y": 2}, "train": {"lr": 1, "lr_steps": (3,)}},
    )
    assert built == Experiment(
        "a", crop=(32, 48), origin=Point(1, 2), train=Optimizer(lr=1.0, lr_steps=[3], kind="sgd")
    )
    assert type(built.train.lr) is float and type(built.crop) is tuple and type(built.train.lr_steps) is list


def test_an_unknown_key_names_its_dotted_path_and_the_closest_known_key() -> None:
    error = fails({"name": "a", "train": {"lr_step": [1]}}, prefix="exp.")
    assert (error.key, error.kind, error.hint) == (
        "exp.train.lr_step",
        "unknown",
        "did you mean 'exp.train.lr_steps'?",
    )
    assert error.problem == "is unknown; did you mean 'exp.train.lr_steps'?"
    assert str(error) == "config key 'exp.train.lr_step' is unknown; did you mean 'exp.train.lr_steps'?"


def test_an_unknown_key_without_a_close_match_lists_the_known_keys() -> None:
    error = fails({"name": "a", "train": {"zzz": 1}})
    assert error.hint == "known keys: lr, lr_steps, kind"


def test_a_missing_required_field_is_named() -> None:
    error = fails({"epochs": 3})
    assert (error.key, error.kind, error.problem) == ("name", "missing", "is required: add it")


@pytest.mark.parametrize(
    ("data", "key", "problem"),
    [
        ({"epochs": 2.5}, "epochs", "must be an integer, got 2.5"),
        ({"epochs": 2.0}, "epochs", "must be an integer, got 2.0"),
        ({"epochs": True}, "epochs", "must be an integer, got True"),
        ({"resume": 1}, "resume", "must be a bool (true or false), got 1"),
        ({"name": 5}, "name", "must be a string, got 5"),
        ({"train": {"lr": "0.1"}}, "train.lr", "must be a float, got '0.1'"),
        ({"train": {"lr": False}}, "train.lr", "must be a float, got False"),
        ({"train": {"kind": "adam"}}, "train.kind", "must be one of 'sgd', 'adamw', got 'adam'"),
        ({"train": {"lr_steps": 8}}, "train.lr_steps", "must be a list of integers, got 8"),
        ({"train": {"lr_steps": [8, "x"]}}, "train.lr_steps[1]", "must be an integer, got 'x'"),
        ({"crop": [32]}, "crop", "must be a list of 2 items (an integer, an integer) or None, got [32]"),
        ({"resources": {"GPU": "one"}}, "resources.GPU", "must be a float, got 'one'"),
        ({"resources": [1]}, "resources", "must be a mapping, got [1]"),
        ({"train": 5}, "train", "must be a mapping (a config section), got 5"),
        ({"origin": 5}, "origin", "must be a mapping ({x: <int>, y: <int>}) or None, got 5"),
    ],
)
def test_a_value_of_the_wrong_type_names_its_key_the_expected_type_and_the_value(
    data: dict, key: str, problem: str
) -> None:
    error = fails({"name": "a", **data})
    assert (error.key, error.problem, error.kind) == (key, problem, "type")
    assert str(error) == f"config key '{key}' {problem}"


def test_none_is_accepted_only_where_the_annotation_allows_it_and_an_empty_section_takes_defaults() -> None:
    assert build(Experiment, {"name": "a", "crop": None, "train": None}).train == Optimizer()
    assert fails({"name": "a", "epochs": None}).problem == "must be an integer, got None"


def test_any_takes_anything() -> None:
    assert build(Experiment, {"name": "a", "notes": {"free": [1, "form"]}}).notes == {"free": [1, "form"]}


def test_a_type_that_parses_itself_reports_its_errors_under_the_key_that_holds_it() -> None:
    refused = fails({"name": "a", "origin": {"x": 1}})
    assert (refused.key, refused.kind) == ("origin", "invalid")
    assert refused.problem == "Point needs exactly x and y, got ['x']"
    inner = fails({"name": "a", "origin": {"x": 1, "y": "2"}}, prefix="exp")
    assert (inner.key, inner.problem) == ("exp.origin.y", "must be an integer, got '2'")


def test_the_whole_config_must_be_a_mapping_and_an_instance_passes_through() -> None:
    error = fails([1, 2])
    assert (error.key, str(error)) == ("", "config must be a mapping (a config section), got [1, 2]")
    instance = Experiment("a")
    assert build(Experiment, instance) is instance


def test_the_label_names_the_config_in_the_message() -> None:
    with pytest.raises(ConfigFieldError, match=re.escape("model config key 'epochs' must be an integer")):
        build(Experiment, {"name": "a", "epochs": "x"}, label="model config")


def test_conform_checks_one_value() -> None:
    assert conform([1, 2], tuple[float, ...], "sizes") == (1.0, 2.0)
    with pytest.raises(ConfigFieldError, match=re.escape("config key 'sizes[0]' must be a float, got 'a'")):
        conform(["a"], tuple[float, ...], "sizes")


@dataclass
class Checked:
    size: float = 1.0
    pair: tuple[int, int] = (1, 2)
    train: Optimizer = field(default_factory=Optimizer)

    def __post_init__(self) -> None:
        check_field_types(self, "demo")


def test_check_field_types_converts_in_place_and_wants_nested_configs_as_instances() -> None:
    checked = Checked(size=3, pair=[4, 5])
    assert type(checked.size) is float and checked.pair == (4, 5)
    with pytest.raises(ConfigFieldError, match=re.escape("'demo.train' must be an Optimizer, got {}")):
        Checked(train={})
    with pytest.raises(ConfigFieldError, match=re.escape("'demo.pair[1]' must be an integer, got None")):
        Checked(pair=(1, None))


def test_plain_is_the_inverse_of_build() -> None:
    experiment = build(Experiment, {"name": "a", "crop": [3, 4], "origin": {"x": 1, "y": 2}})
    data = plain(experiment)
    assert data["crop"] == [3, 4] and data["origin"] == {"x": 1, "y": 2} and data["train"]["lr"] == 0.1
    assert plain_fields(experiment) == data
    assert build(Experiment, data) == experiment

"""``--set key=value`` overrides: values read as YAML 1.2, dotted keys set in a copy, model keys checked
against the model's fields with a did-you-mean."""

from __future__ import annotations

import pytest
from knet_platform.experiment.building import ExperimentError
from knet_platform.experiment.overrides import apply_overrides, parse_override
from knet_platform.experiment.schema import MODEL_KEYS


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train.lr=2e-4", ("train.lr", 2e-4)),  # YAML 1.2: a float, not the string "2e-4"
        ("train.grad_clip=null", ("train.grad_clip", None)),
        ("train.lr_steps=[8, 11]", ("train.lr_steps", [8, 11])),
        ("tracking.alias=best", ("tracking.alias", "best")),
        ("scaling.resources_per_worker={CPU: 0.5}", ("scaling.resources_per_worker", {"CPU": 0.5})),
        ("model.aux_head=false", ("model.aux_head", False)),
        ("tracking.uri=", ("tracking.uri", "")),
    ],
)
def test_a_value_is_read_as_yaml(text: str, expected: tuple[str, object]) -> None:
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["train.lr", "=3", "train..lr=3", "train.lr=[1, 2"])
def test_a_malformed_override_is_refused_naming_it(text: str) -> None:
    with pytest.raises(ExperimentError, match="bad override"):
        parse_override(text)


def test_overrides_set_dotted_keys_in_a_copy_and_create_missing_sections() -> None:
    raw = {"train": {"lr": 1.0, "epochs": 3}}
    result = apply_overrides(raw, {"train.lr": 2.0, "data.synthetic.seed": 4}, model_keys=MODEL_KEYS)
    assert result == {"train": {"lr": 2.0, "epochs": 3}, "data": {"synthetic": {"seed": 4}}}
    assert raw == {"train": {"lr": 1.0, "epochs": 3}}  # the original is untouched


def test_a_model_key_must_name_a_model_field_with_a_did_you_mean() -> None:
    assert {"model.num_proposals", "model.update.num_heads", "model.backbone.name"} <= MODEL_KEYS
    with pytest.raises(
        ExperimentError, match="unknown key 'model.num_proposal': did you mean 'model.num_proposals'"
    ):
        apply_overrides({}, {"model.num_proposal": 50}, model_keys=MODEL_KEYS)


def test_a_key_below_a_value_that_is_not_a_section_is_refused() -> None:
    with pytest.raises(ExperimentError, match="cannot set 'train.lr.x': 'train.lr' is 0.1, not a section"):
        apply_overrides({"train": {"lr": 0.1}}, {"train.lr.x": 1}, model_keys=MODEL_KEYS)

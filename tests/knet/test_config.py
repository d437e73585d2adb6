"""KNetConfig: paper defaults, presets, strict round-tripping and validation messages."""

from __future__ import annotations

import json

import pytest

from knet import KNetConfig


def test_defaults_are_the_paper_panoptic_r50_settings() -> None:
    cfg = KNetConfig()
    assert (cfg.task, cfg.num_thing_classes, cfg.num_stuff_classes) == ("panoptic", 80, 53)
    assert (cfg.num_proposals, cfg.num_stages, cfg.channels, cfg.size_divisor) == (100, 3, 256, 32)
    assert (cfg.backbone.name, cfg.backbone.frozen_stages, cfg.backbone.norm_eval) == ("resnet50", 1, True)
    assert (
        cfg.update.conv_kernel_size == 1
        and cfg.update.feedforward_channels == 2048
        and cfg.update.num_heads == 8
    )
    assert (cfg.loss.cls_weight, cfg.loss.mask_weight, cfg.loss.dice_weight, cfg.loss.rank_weight) == (
        2.0,
        1.0,
        4.0,
        0.1,
    )
    assert (cfg.matcher.cls_cost, cfg.matcher.dice_cost, cfg.matcher.mask_cost) == (2.0, 4.0, 1.0)
    assert (cfg.inference.instance_score_thr, cfg.inference.overlap_thr, cfg.inference.max_per_image) == (
        0.3,
        0.6,
        100,
    )
    assert KNetConfig.coco_panoptic_r50() == cfg


def test_num_classes_counts_stuff_except_for_instance() -> None:
    assert KNetConfig.coco_panoptic_r50().num_classes == 133
    assert KNetConfig.coco_instance_r50().num_classes == 80
    semantic = KNetConfig.ade20k_semantic_upernet_r50()
    assert semantic.num_classes == 150 and semantic.decode_head == "uper" and semantic.aux_head


def test_presets_switch_the_inference_outputs_per_task() -> None:
    instance = KNetConfig.coco_instance_r50().inference
    assert (instance.panoptic_on, instance.instance_on, instance.semantic_on) == (False, True, False)
    semantic = KNetConfig.ade20k_semantic_upernet_r50().inference
    assert (semantic.panoptic_on, semantic.instance_on, semantic.semantic_on) == (False, False, True)


def test_to_dict_is_json_safe_and_round_trips() -> None:
    cfg = KNetConfig.for_task("panoptic", num_thing_classes=3, num_stuff_classes=2, backbone="resnet18")
    data = json.loads(json.dumps(cfg.to_dict()))
    assert KNetConfig.from_dict(data) == cfg


def test_for_task_merges_nested_overrides_with_the_preset() -> None:
    cfg = KNetConfig.for_task(
        "instance", num_thing_classes=5, num_stuff_classes=0, update={"conv_kernel_size": 3}, num_proposals=10
    )
    assert cfg.update.conv_kernel_size == 3 and cfg.update.feedforward_channels == 2048
    assert cfg.num_proposals == 10 and not cfg.inference.panoptic_on


def test_unknown_nested_key_names_the_dotted_path_and_suggests_the_closest() -> None:
    with pytest.raises(ValueError, match=r"update\.num_head'.*did you mean 'update\.num_heads'"):
        KNetConfig.from_dict({"update": {"num_head": 4}})


def test_unknown_top_level_key_suggests_the_closest() -> None:
    with pytest.raises(ValueError, match="did you mean 'num_proposals'"):
        KNetConfig.from_dict({"num_proposal": 4})


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"task": "detection"}, "task"),
        ({"channels": 48}, "channels"),
        ({"num_stages": 0}, "num_stages"),
        ({"decode_head": "deeplab"}, "decode_head"),
        ({"update": {"conv_kernel_size": 2}}, "update.conv_kernel_size"),
        ({"update": {"hard_mask_thr": 1.5}}, "update.hard_mask_thr"),
        ({"backbone": {"output_stride": 4}}, "backbone.output_stride"),
        ({"loss": {"dice_weight": -1}}, "loss.dice_weight"),
        ({"inference": {"overlap_thr": 2}}, "inference.overlap_thr"),
        ({"task": "instance", "num_stuff_classes": 3}, "num_stuff_classes"),
    ],
)
def test_invalid_values_raise_an_error_naming_the_field(data: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        KNetConfig.from_dict(data)


def test_for_task_accepts_a_backbone_section_merged_over_the_preset() -> None:
    cfg = KNetConfig.for_task(
        "semantic",
        num_thing_classes=0,
        num_stuff_classes=4,
        backbone={"name": "resnet18", "output_stride": 8},
    )
    assert (cfg.backbone.name, cfg.backbone.output_stride, cfg.backbone.norm_eval) == ("resnet18", 8, False)

"""KNetConfig: paper defaults, presets, strict round-tripping and validation messages."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import pytest

from knet import BackboneConfig, InferenceConfig, KernelUpdateConfig, KNetConfig, LossConfig
from knet.config import ConfigFieldError, check_field_types


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
        ({"test_size_divisor": 1}, "test_size_divisor must be a positive multiple of 32 for task 'panoptic'"),
        ({"task": "instance", "num_stuff_classes": 0, "test_size_divisor": 48}, "test_size_divisor"),
        ({"task": "semantic", "test_size_divisor": 0}, r"test_size_divisor must be >= 1 \(1 = no padding\)"),
    ],
)
def test_invalid_values_raise_an_error_naming_the_field(data: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        KNetConfig.from_dict(data)


def test_test_time_padding_follows_each_reference_test_pipeline() -> None:
    """mmdet's K-Net test pipeline pads to 32 (Pad size_divisor=32); mmseg's has no Pad (1 = unpadded).
    Training pads to 32 in both."""
    for task, things, stuff in (("panoptic", 80, 53), ("instance", 80, 0)):
        cfg = KNetConfig.for_task(task, num_thing_classes=things, num_stuff_classes=stuff)
        assert (cfg.size_divisor, cfg.test_size_divisor) == (32, 32)
    for cfg in (KNetConfig.ade20k_semantic_upernet_r50(), KNetConfig.ade20k_semantic_upernet_r50_mmseg()):
        assert (cfg.size_divisor, cfg.test_size_divisor) == (32, 1)
    padded = KNetConfig.for_task("semantic", num_thing_classes=0, num_stuff_classes=4, test_size_divisor=32)
    assert padded.test_size_divisor == 32 and KNetConfig.from_dict(padded.to_dict()) == padded
    with pytest.raises(ValueError, match="'test_size_divisor' must be an integer, got '1'"):
        KNetConfig.from_dict({"task": "semantic", "test_size_divisor": "1"})


def test_each_task_defaults_to_the_backbone_its_reference_starts_from() -> None:
    """torchvision's ResNet-50 (7x7 stem) for mmdet's K-Net, ResNetV1c (deep stem, timm's resnet50c) for
    mmseg's; a backbone section without a name keeps the task's reference backbone."""
    names = {
        task: KNetConfig.for_task(
            task, num_thing_classes=3, num_stuff_classes=2 * (task != "instance")
        ).backbone.name
        for task in ("panoptic", "instance", "semantic")
    }
    assert names == {"panoptic": "resnet50", "instance": "resnet50", "semantic": "resnet50c"}
    section = KNetConfig.for_task(
        "semantic", num_thing_classes=0, num_stuff_classes=4, backbone={"frozen_stages": 0}
    )
    assert (section.backbone.name, section.backbone.frozen_stages) == ("resnet50c", 0)
    assert (
        KNetConfig.for_task(
            "semantic", num_thing_classes=0, num_stuff_classes=4, backbone="resnet18"
        ).backbone.name
        == "resnet18"
    )


def test_the_two_upernet_presets_have_the_widths_of_their_released_checkpoints() -> None:
    """The original K-Net's UPerNet R-50 is 256 wide throughout; mmseg's re-trained one is 512 wide with a
    256-d KernelUpdator (its keys: conv_seg (150, 512), kernel_update_conv.fc_layer (256, 256))."""
    original, mmseg = KNetConfig.ade20k_semantic_upernet_r50(), KNetConfig.ade20k_semantic_upernet_r50_mmseg()
    assert (original.channels, original.update.updator_channels) == (256, None)
    assert (mmseg.channels, mmseg.update.updator_channels) == (512, 256)
    for cfg in (original, mmseg):
        assert (cfg.backbone.name, cfg.backbone.output_stride, cfg.decode_head, cfg.num_classes) == (
            "resnet50c",
            32,
            "uper",
            150,
        )
        assert (cfg.backbone.frozen_stages, cfg.backbone.norm_eval, cfg.aux_head) == (-1, False, True)


def test_for_task_accepts_a_backbone_section_merged_over_the_preset() -> None:
    cfg = KNetConfig.for_task(
        "semantic",
        num_thing_classes=0,
        num_stuff_classes=4,
        backbone={"name": "resnet18", "output_stride": 8},
    )
    assert (cfg.backbone.name, cfg.backbone.output_stride, cfg.backbone.norm_eval) == ("resnet18", 8, False)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"num_proposals": 2.5}, "'num_proposals' must be an integer, got 2.5"),
        ({"num_proposals": "100"}, "'num_proposals' must be an integer, got '100'"),
        ({"channels": 256.0}, "'channels' must be an integer, got 256.0"),
        ({"num_stages": True}, "'num_stages' must be an integer, got True"),
        ({"aux_head": "yes"}, "'aux_head' must be a bool (true or false), got 'yes'"),
        ({"aux_head": 1}, "'aux_head' must be a bool (true or false), got 1"),
        ({"task": 3}, "'task' must be one of 'panoptic', 'instance', 'semantic', got 3"),
        ({"backbone": {"name": 5}}, "'backbone.name' must be a string, got 5"),
        ({"backbone": {"pretrained_path": 3}}, "'backbone.pretrained_path' must be a string or None, got 3"),
        (
            {"backbone": {"norm_eval": "false"}},
            "'backbone.norm_eval' must be a bool (true or false), got 'false'",
        ),
        ({"update": {"dropout": None}}, "'update.dropout' must be a float, got None"),
        ({"update": {"num_heads": 8.0}}, "'update.num_heads' must be an integer, got 8.0"),
        (
            {"update": {"updator_channels": "128"}},
            "'update.updator_channels' must be an integer or None, got '128'",
        ),
        ({"loss": {"cls_weight": "2"}}, "'loss.cls_weight' must be a float, got '2'"),
        ({"loss": {"dice_weight": False}}, "'loss.dice_weight' must be a float, got False"),
        ({"matcher": {"mask_cost": [1.0]}}, "'matcher.mask_cost' must be a float, got [1.0]"),
        (
            {"inference": {"panoptic_on": "no"}},
            "'inference.panoptic_on' must be a bool (true or false), got 'no'",
        ),
        ({"inference": {"max_per_image": 1e2}}, "'inference.max_per_image' must be an integer, got 100.0"),
        ({"update": 5}, "'update' must be a mapping (a config section), got 5"),
    ],
)
def test_values_of_the_wrong_type_raise_an_error_naming_the_key_and_the_type(
    data: dict, message: str
) -> None:
    with pytest.raises(ConfigFieldError, match=f"^model config key {re.escape(message)}$"):
        KNetConfig.from_dict(data)


def test_a_type_error_carries_its_key_for_callers_that_prefix_their_own_section() -> None:
    with pytest.raises(ValueError) as caught:
        KNetConfig.for_task("panoptic", num_thing_classes=2, num_stuff_classes=1, update={"dropout": None})
    assert isinstance(caught.value, ConfigFieldError)
    assert (caught.value.key, caught.value.problem) == ("update.dropout", "must be a float, got None")


@pytest.mark.parametrize(
    ("build", "key"),
    [
        (lambda: KNetConfig(num_proposals=2.5), "num_proposals"),
        (lambda: KNetConfig(backbone={"name": "resnet18"}), "backbone"),
        (lambda: BackboneConfig(frozen_stages="1"), "backbone.frozen_stages"),
        (lambda: KernelUpdateConfig(gate_sigmoid=1), "update.gate_sigmoid"),
        (lambda: LossConfig(rank_weight=None), "loss.rank_weight"),
        (lambda: InferenceConfig(semantic_on="yes"), "inference.semantic_on"),
    ],
)
def test_dataclasses_built_directly_check_their_types_too(build, key: str) -> None:  # noqa: ANN001
    with pytest.raises(ConfigFieldError, match=f"'{re.escape(key)}' must be"):
        build()


def test_ints_are_accepted_and_stored_as_floats_in_float_fields() -> None:
    cfg = KNetConfig.from_dict({"loss": {"cls_weight": 3}, "inference": {"mask_thr": 1}})
    assert type(cfg.loss.cls_weight) is float and cfg.loss.cls_weight == 3.0
    assert type(cfg.inference.mask_thr) is float and cfg.inference.mask_thr == 1.0


@dataclass
class _Sequences:
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    pair: tuple[int, float] = (1, 2.0)

    def __post_init__(self) -> None:
        check_field_types(self, "demo")


def test_list_and_tuple_fields_are_checked_item_by_item_and_take_their_container() -> None:
    assert _Sequences(sizes=(3, 4), pair=[5, 6]) == _Sequences(sizes=[3, 4], pair=(5, 6.0))
    with pytest.raises(ConfigFieldError, match=r"'demo\.sizes\[1\]' must be an integer, got 'b'"):
        _Sequences(sizes=[1, "b"])
    with pytest.raises(
        ConfigFieldError, match=r"'demo\.pair' must be a list of 2 items \(an integer, a float\)"
    ):
        _Sequences(pair=(1,))
    with pytest.raises(ConfigFieldError, match=r"'demo\.sizes' must be a list of integers, got 3"):
        _Sequences(sizes=3)

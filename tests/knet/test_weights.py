"""knet.weights: the published K-Net checkpoints map onto our model, tensor for tensor, or are refused
naming the keys at fault.

The checkpoints are built from the reference key lists (tests/knet/reference_weights, from shared/reference-weights: the exact
state-dict keys and shapes of the official K-Net's panoptic/instance R50 and mmsegmentation's
UPerNet/FCN/PSP/ASPP K-Net), since the real files cannot be downloaded here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from knet import KNetConfig, build_model
from knet.data.known_categories import known_categories
from knet.safe_load import UnsafeWeightsError
from knet.weights import (
    WeightsImportError,
    config_from_reference,
    load_official,
    model_shapes,
    to_reference,
)

REFERENCE = Path(__file__).absolute().parent / "reference_weights"  # copied from shared/reference-weights
OFFICIAL = json.loads((REFERENCE / "official_knet_mmdet2.json").read_text())
MMSEG = json.loads((REFERENCE / "mmseg_knet.json").read_text())
CASES = {
    "panoptic": ("official-knet", "panoptic", OFFICIAL["panoptic_r50"]),
    "instance": ("official-knet", "instance", OFFICIAL["instance_r50"]),
    **{
        f"semantic-{head}": ("mmseg-knet", "semantic", MMSEG[head]) for head in ("uper", "fcn", "psp", "aspp")
    },
}


def reference_tensors(keys: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """A distinct random tensor for every key of a reference list, at its shape."""
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.randint(0, 1000, shape, generator=generator)
        if key.endswith("num_batches_tracked")
        else torch.randn(shape, generator=generator)
        for key, shape in keys.items()
    }


def published_config(case: str) -> KNetConfig:
    fmt, task, keys = CASES[case]
    return config_from_reference({k: torch.empty(s, device="meta") for k, s in keys.items()}, fmt, task)


@pytest.mark.parametrize("case", list(CASES))
def test_our_model_has_exactly_the_reference_keys_and_shapes(case):
    fmt, _, keys = CASES[case]
    config = published_config(case)
    shapes = model_shapes(config)
    ours = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    renamed = to_reference(ours, config, fmt)
    assert {key: list(value.shape) for key, value in renamed.items()} == keys


def test_the_published_models_configs_are_read_from_their_shapes():
    seen = {case: published_config(case) for case in CASES}
    for case in ("panoptic", "instance"):
        config = seen[case]
        assert (config.num_proposals, config.num_stages, config.channels) == (100, 3, 256)
        assert config.backbone.name == "resnet50" and config.update.updator_channels is None
        assert config.test_size_divisor == 32  # mmdet's test pipeline pads to 32
        assert (config.update.num_cls_fcs, config.update.num_mask_fcs, config.update.conv_kernel_size) == (
            1,
            1,
            1,
        )
    assert (seen["panoptic"].num_thing_classes, seen["panoptic"].num_stuff_classes) == (80, 53)
    assert (seen["instance"].num_thing_classes, seen["instance"].num_stuff_classes) == (80, 0)
    for head in ("uper", "fcn", "psp", "aspp"):
        config = seen[f"semantic-{head}"]
        assert config.decode_head == head and config.aux_head and config.num_stages == 3
        assert (config.num_thing_classes, config.num_stuff_classes) == (0, 150)
        # mmseg's published K-Nets are 512 wide with a 256-d updator, UPerNet included
        assert (config.channels, config.update.updator_channels, config.update.feedforward_channels) == (
            512,
            256,
            2048,
        )
        assert config.backbone.name == "resnet50c"  # ResNetV1c: the deep stem
        assert config.backbone.output_stride == (32 if head == "uper" else 8)
        assert (config.backbone.frozen_stages, config.backbone.norm_eval) == (-1, False)
        assert config.test_size_divisor == 1  # mmseg tests each image unpadded: the published mIoU


def test_the_published_checkpoints_are_our_reference_presets():
    assert published_config("panoptic") == KNetConfig.coco_panoptic_r50()
    assert published_config("instance") == KNetConfig.coco_instance_r50()
    assert published_config("semantic-uper") == KNetConfig.ade20k_semantic_upernet_r50_mmseg()


@pytest.mark.parametrize("case", list(CASES))
def test_a_released_checkpoint_round_trips_tensors_and_predictions(case, tmp_path):
    fmt, task, _ = CASES[case]
    config = published_config(case)
    torch.manual_seed(0)
    model = build_model(config).eval()
    for name, buffer in model.named_buffers():  # BN statistics must travel too
        if name.endswith(("running_mean", "running_var")):
            buffer.uniform_(0.5, 1.5)
    path = tmp_path / "released.pth"
    meta = {"CLASSES": tuple(known_categories("ade20k" if fmt == "mmseg-knet" else f"coco-{task}").names)}
    torch.save({"meta": meta, "state_dict": to_reference(model.state_dict(), config, fmt)}, path)

    images = torch.randn(1, 3, 32, 64)
    with torch.no_grad():
        _, expected = model.predict_stages(images)

    imported_config, state = load_official(path, format=fmt, task=task)

    assert imported_config == config  # so build_model(imported_config) is this architecture
    assert state.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key
    with torch.no_grad():  # forget the weights, then predict with the imported ones
        for value in model.state_dict().values():
            value.copy_(torch.zeros_like(value))
        model.load_state_dict(state)
        _, got = model.predict_stages(images)
    assert torch.equal(got[-1].mask_logits, expected[-1].mask_logits)
    if task != "semantic":
        assert torch.equal(got[-1].cls_logits, expected[-1].cls_logits)


@pytest.mark.parametrize("case", list(CASES))
def test_every_checkpoint_tensor_is_used_once_under_its_own_name(case):
    fmt, task, keys = CASES[case]
    checkpoint = reference_tensors(keys)
    _, state = load_official({"meta": {}, "state_dict": checkpoint}, format=fmt, task=task)
    assert len(state) == len(checkpoint)
    assert {id(t) for t in state.values()} == {id(t) for t in checkpoint.values()}  # nothing made up


def test_names_are_mapped_as_the_reference_modules_are_built():
    official = reference_tensors(OFFICIAL["panoptic_r50"])
    _, state = load_official(official, format="official-knet", task="panoptic")
    pairs = {
        "rpn_head.localization_fpn.convs_all_levels.3.conv2.gn.weight": "kernel_head.localization_fpn.level_convs.3.4.1.weight",
        "rpn_head.localization_fpn.aux_convs.0.conv.weight": "kernel_head.localization_fpn.aux_conv.0.weight",
        "neck.fpn_convs.2.conv.bias": "neck.output_convs.2.bias",
        "roi_head.mask_head.2.ffn.layers.1.weight": "stages.2.ffn.3.weight",
        "roi_head.mask_head.1.attention.attn.in_proj_weight": "stages.1.attention.in_proj_weight",
        "backbone.layer3.5.bn2.running_var": "backbone.body.layer3.5.bn2.running_var",
    }
    for reference, ours in pairs.items():
        assert state[ours] is official[reference], reference
    mmseg = reference_tensors(MMSEG["uper"])
    _, state = load_official(mmseg, format="mmseg-knet", task="semantic")
    pairs = {
        "backbone.stem.7.weight": "backbone.body.bn1.weight",
        "backbone.stem.6.weight": "backbone.body.conv1.6.weight",
        "decode_head.kernel_generate_head.bottleneck.conv.weight": "kernel_head.decode_head.psp_bottleneck.0.weight",
        "decode_head.kernel_generate_head.psp_modules.3.1.bn.running_mean": "kernel_head.decode_head.pyramid.branches.3.1.1.running_mean",
        "auxiliary_head.conv_seg.bias": "kernel_head.aux_head.2.bias",
        "decode_head.kernel_update_head.0.kernel_update_conv.dynamic_layer.weight": "stages.0.kernel_update_conv.dynamic_layer.weight",
    }
    for reference, ours in pairs.items():
        assert state[ours] is mmseg[reference], reference


def refusal(checkpoint: dict[str, torch.Tensor], task: str = "instance", fmt: str = "official-knet") -> str:
    with pytest.raises(WeightsImportError) as error:
        load_official(checkpoint, format=fmt, task=task)
    assert len(str(error.value).splitlines()) == 1  # the CLI shows one line
    return str(error.value)


def test_a_renamed_key_is_refused_naming_it_and_what_is_then_missing():
    checkpoint = reference_tensors(OFFICIAL["instance_r50"])
    checkpoint["roi_head.mask_head.1.fc_mask_.weight"] = checkpoint.pop("roi_head.mask_head.1.fc_mask.weight")
    message = refusal(checkpoint)
    assert "1 unmapped: roi_head.mask_head.1.fc_mask_.weight" in message
    assert "1 missing: roi_head.mask_head.1.fc_mask.weight" in message


def test_a_wrong_shape_is_refused_naming_the_key_and_both_shapes():
    checkpoint = reference_tensors(OFFICIAL["instance_r50"])
    checkpoint["neck.fpn_convs.1.conv.weight"] = torch.zeros(256, 256, 1, 1)
    message = refusal(checkpoint)
    assert (
        "1 mismatched: neck.fpn_convs.1.conv.weight [256, 256, 1, 1] (the model needs [256, 256, 3, 3])"
        in message
    )
    assert "missing" not in message


def test_a_missing_key_is_refused_naming_it():
    checkpoint = reference_tensors(MMSEG["fcn"])
    del checkpoint["decode_head.kernel_generate_head.conv_cat.bn.running_var"]
    message = refusal(checkpoint, "semantic", "mmseg-knet")
    assert "1 missing: decode_head.kernel_generate_head.conv_cat.bn.running_var" in message


def test_extra_keys_are_refused_naming_them():
    checkpoint = reference_tensors(OFFICIAL["panoptic_r50"])
    checkpoint["ema_roi_head.mask_head.0.fc_cls.weight"] = torch.zeros(133, 256)
    checkpoint["roi_head.mask_head.0.cls_fcs.0.conv_offset.weight"] = torch.zeros(3)
    message = refusal(checkpoint, "panoptic")
    assert (
        "2 unmapped: ema_roi_head.mask_head.0.fc_cls.weight, roi_head.mask_head.0.cls_fcs.0.conv_offset.weight"
        in message
    )
    assert "deformable convolutions" in message


def test_a_key_the_config_is_read_from_is_named_when_missing():
    checkpoint = reference_tensors(OFFICIAL["instance_r50"])
    del checkpoint["rpn_head.init_kernels.weight"]
    assert "no key rpn_head.init_kernels.weight" in refusal(checkpoint)


def test_format_and_task_must_agree_and_the_backbone_must_be_a_resnet():
    checkpoint = reference_tensors(OFFICIAL["instance_r50"])
    assert "use --format official-knet for panoptic/instance" in refusal(checkpoint, "semantic")
    swin = {k.replace("backbone.layer", "backbone.stages."): v for k, v in checkpoint.items()}
    assert "only ResNet backbones can be imported" in refusal(swin)


def test_a_panoptic_split_other_than_cocos_must_be_given():
    checkpoint = reference_tensors(OFFICIAL["instance_r50"])  # 80 classes, read as panoptic
    assert "say how many are things" in refusal(checkpoint, "panoptic")
    config, _ = load_official(checkpoint, format="official-knet", task="panoptic", num_thing_classes=70)
    assert (config.num_thing_classes, config.num_stuff_classes) == (70, 10)


def test_a_bare_state_dict_file_is_read_and_a_pickled_object_refused(tmp_path):
    bare = tmp_path / "bare.pth"
    torch.save(reference_tensors(OFFICIAL["instance_r50"]), bare)
    config, _ = load_official(bare, format="official-knet", task="instance")
    assert config.num_thing_classes == 80
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"meta": {"path": Path("x")}, "state_dict": {}}, unsafe)
    with pytest.raises(UnsafeWeightsError, match="re-save only its tensors"):
        load_official(unsafe, format="official-knet", task="instance")
    with pytest.raises(WeightsImportError, match="does not exist"):
        load_official(tmp_path / "nothing.pth", format="official-knet", task="instance")


def test_the_known_class_lists_are_in_the_datasets_contiguous_order():
    panoptic, instance, ade = (known_categories(n) for n in ("coco-panoptic", "coco-instance", "ade20k"))
    assert (panoptic.num_thing_classes, panoptic.num_stuff_classes) == (80, 53)
    assert panoptic.names[:80] == instance.names and instance.num_stuff_classes == 0
    assert [panoptic.names[i] for i in (0, 79, 80, 132)] == ["person", "toothbrush", "banner", "rug-merged"]
    assert [panoptic.to_dataset_id(i) for i in (0, 79, 80, 132)] == [1, 90, 92, 200]
    assert (ade.num_thing_classes, ade.num_stuff_classes) == (0, 150)
    assert [ade.names[i] for i in (0, 7, 149)] == ["wall", "bed", "flag"] and len(set(ade.names)) == 150


@pytest.mark.parametrize(
    ("fmt", "task", "backbone", "extra"),
    [
        ("official-knet", "panoptic", "resnet101", {}),
        ("official-knet", "instance", "resnet18", {"num_proposals": 7, "num_stages": 2}),
        ("official-knet", "panoptic", "resnet34", {"update": {"gate_norm_act": True, "num_mask_fcs": 2}}),
        ("mmseg-knet", "semantic", "resnet50d", {"decode_head": "psp"}),
        ("mmseg-knet", "semantic", "resnet101c", {"decode_head": "uper", "channels": 256, "aux_head": False}),
    ],
)
def test_other_depths_stems_and_sizes_are_read_back(fmt, task, backbone, extra):
    semantic = task == "semantic"
    config = KNetConfig.for_task(
        task,
        num_thing_classes=0 if semantic else 5,
        num_stuff_classes={"panoptic": 3, "instance": 0, "semantic": 7}[task],
        backbone=backbone if not semantic else {"name": backbone, "frozen_stages": -1, "norm_eval": False},
        **extra,
    )
    shapes = {key: torch.empty(shape, device="meta") for key, shape in model_shapes(config).items()}
    reference = to_reference(shapes, config, fmt)
    things = 5 if task == "panoptic" else None
    assert config_from_reference(reference, fmt, task, num_thing_classes=things) == config

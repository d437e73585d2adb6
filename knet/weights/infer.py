"""The model config a reference checkpoint was trained with, read from its tensors' shapes.

What shapes tell: proposals, stages, classes, widths (model, updator, FFN), the conv kernel size, the
number of cls/mask FCs, the semantic decode head and whether it has the auxiliary head, and the ResNet
(depth from the blocks per stage, the stem kind). What they cannot tell is taken from the released
configs: 8 attention heads; the thing/stuff split of a panoptic model (80 + 53 for COCO's 133 classes,
else the caller says); the semantic backbone's output stride (UPerNet runs an undilated ResNet, the
FCN/PSP/ASPP heads a dilated one at stride 8, as mmsegmentation's K-Net configs).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from knet.config import KNetConfig, Task
from knet.errors import KnetInputError
from knet.weights.names import Format

COCO_PANOPTIC_THINGS, COCO_PANOPTIC_CLASSES = 80, 133
# blocks per ResNet stage (and whether the blocks are bottlenecks) -> depth
_RESNET_DEPTHS = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}
_STAGE_PREFIX = {"official-knet": "roi_head.mask_head", "mmseg-knet": "decode_head.kernel_update_head"}


class WeightsImportError(KnetInputError):
    """A checkpoint that does not map onto K-Net: the message names the keys at fault."""


def _shape(state: Mapping[str, Tensor], key: str, why: str) -> tuple[int, ...]:
    if key not in state:
        raise WeightsImportError(f"cannot read {why}: the checkpoint has no key {key}")
    return tuple(state[key].shape)


def _indices(state: Mapping[str, Tensor], prefix: str) -> list[int]:
    """The sorted module indices ``i`` of keys ``<prefix>.<i>.*``."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for key in state if (m := pattern.match(key))})


def backbone_name(state: Mapping[str, Tensor]) -> str:
    """The timm ResNet holding the checkpoint's backbone: resnet<depth>, with ``c`` for ResNetV1c's
    deep stem and ``d`` for V1d's (deep stem + average-pool shortcut)."""
    blocks = tuple(len(_indices(state, f"backbone.layer{stage}")) for stage in (1, 2, 3, 4))
    bottleneck = "backbone.layer1.0.conv3.weight" in state
    depth = _RESNET_DEPTHS.get((blocks, bottleneck))
    if depth is None:
        found = sorted({key.split(".")[1] for key in state if key.startswith("backbone.")})[:8]
        raise WeightsImportError(
            f"the checkpoint's backbone is not a ResNet-18/34/50/101/152 (blocks per stage {blocks}, "
            f"backbone modules {found}); only ResNet backbones can be imported"
        )
    if "backbone.stem.0.weight" not in state:
        return f"resnet{depth}"
    avg_down = len(state.get("backbone.layer1.0.downsample.1.weight", Tensor()).shape) == 4
    return f"resnet{depth}{'d' if avg_down else 'c'}"


def decode_head_kind(state: Mapping[str, Tensor]) -> str:
    """mmseg's kernel_generate_head type from its module names."""
    head = "decode_head.kernel_generate_head."
    names = {key[len(head) :].split(".")[0] for key in state if key.startswith(head)}
    if "lateral_convs" in names and "psp_modules" in names:
        return "uper"
    if "aspp_modules" in names:
        return "aspp"
    if "psp_modules" in names:
        return "psp"
    if "conv_cat" in names or "convs" in names:
        return "fcn"
    raise WeightsImportError(
        f"cannot tell the semantic decode head: {head}* holds {sorted(names) or 'nothing'}, "
        "expected UPerNet (psp_modules + lateral_convs), PSPNet (psp_modules), DeepLabV3 (aspp_modules) "
        "or FCN (convs)"
    )


def _update_section(
    state: Mapping[str, Tensor], stage: str, channels: int, *, classifier: bool = True
) -> dict[str, Any]:
    """The KernelUpdateHead widths of stage 0 (all stages share one config); without a classifier
    (semantic) ``num_cls_fcs`` is left to the preset, the model never builds those FCs."""
    embed = _shape(state, f"{stage}.attention.attn.in_proj_weight", "the kernel size")[1]
    kernel_size = round((embed / channels) ** 0.5)
    updator = _shape(state, f"{stage}.kernel_update_conv.dynamic_layer.weight", "the updator width")[1]
    ffn = _shape(state, f"{stage}.ffn.layers.0.0.weight", "the FFN width")[0]

    def linear_count(name: str) -> int:
        return sum(
            1 for i in _indices(state, f"{stage}.{name}") if state[f"{stage}.{name}.{i}.weight"].dim() == 2
        )

    section = {
        "conv_kernel_size": kernel_size,
        "feedforward_channels": ffn,
        "num_mask_fcs": linear_count("mask_fcs"),
        "updator_channels": None if updator == channels else updator,
        "gate_norm_act": f"{stage}.kernel_update_conv.gate_norm.weight" in state,
    }
    return {**section, "num_cls_fcs": linear_count("cls_fcs")} if classifier else section


def config_from_reference(
    state: Mapping[str, Tensor], format: Format, task: Task, *, num_thing_classes: int | None = None
) -> KNetConfig:
    """The KNetConfig of a reference state dict (reference key names). ``num_thing_classes``: the
    panoptic thing/stuff split when the checkpoint is not COCO's 133 classes."""
    if (format == "mmseg-knet") != (task == "semantic"):
        raise WeightsImportError(
            f"format {format} holds {'semantic' if format == 'mmseg-knet' else 'panoptic or instance'} "
            f"models, not task {task}: use --format official-knet for panoptic/instance, mmseg-knet for semantic"
        )
    stages = _indices(state, _STAGE_PREFIX[format])
    if not stages or stages != list(range(len(stages))):
        raise WeightsImportError(
            f"the checkpoint's update stages {_STAGE_PREFIX[format]}.<i> are {stages or 'missing'}; expected 0..S-1"
        )
    first = f"{_STAGE_PREFIX[format]}.0"
    if format == "mmseg-knet":
        return _semantic_config(state, first, len(stages))
    proposals, channels = _shape(state, "rpn_head.init_kernels.weight", "the number of proposals")[:2]
    classes = _shape(state, f"{first}.fc_cls.weight", "the number of classes")[0]
    if task == "instance":
        things = classes
    elif num_thing_classes is not None:
        things = num_thing_classes
    elif classes == COCO_PANOPTIC_CLASSES:
        things = COCO_PANOPTIC_THINGS
    else:
        raise WeightsImportError(
            f"a panoptic checkpoint with {classes} classes: say how many are things (num_thing_classes, or "
            "a class list with isthing); only COCO's 133 = 80 things + 53 stuff is known"
        )
    if not 0 < things <= classes:
        raise WeightsImportError(
            f"num_thing_classes={things} (the things of the class list) does not fit the checkpoint's "
            f"{classes} classes"
        )
    return _build(
        task,
        things=things,
        stuff=classes - things,
        backbone={"name": backbone_name(state)},
        num_proposals=proposals,
        num_stages=len(stages),
        channels=channels,
        update=_update_section(state, first, channels),
    )


def _semantic_config(state: Mapping[str, Tensor], first: str, num_stages: int) -> KNetConfig:
    classes, channels = _shape(state, "decode_head.kernel_generate_head.conv_seg.weight", "the classes")[:2]
    head = decode_head_kind(state)
    backbone = {
        "name": backbone_name(state),
        "frozen_stages": -1,  # mmseg trains every stage and its BN statistics
        "norm_eval": False,
        "output_stride": 32 if head == "uper" else 8,
    }
    return _build(
        "semantic",
        things=0,
        stuff=classes,
        backbone=backbone,
        num_stages=num_stages,
        channels=channels,
        decode_head=head,
        aux_head=any(key.startswith("auxiliary_head.") for key in state),
        update=_update_section(state, first, channels, classifier=False),
    )


def _build(task: Task, *, things: int, stuff: int, backbone: dict[str, Any], **fields: Any) -> KNetConfig:
    """Every inferred field given explicitly, so the result does not depend on preset defaults."""
    try:
        return KNetConfig.for_task(
            task, num_thing_classes=things, num_stuff_classes=stuff, backbone=backbone, **fields
        )
    except ValueError as error:
        raise WeightsImportError(f"the checkpoint's shapes give an invalid model config: {error}") from None

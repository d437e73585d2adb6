"""K-Net model configuration: a tree of self-validating dataclasses.

One source of defaults: every dataclass default equals the paper's panoptic ResNet-50 setting
(knet_s3_r50_fpn_1x_coco-panoptic; see knet-spec.md sections 1-2). ``build_model`` (knet/build.py) is the
only place these values meet module constructors, which take explicit keyword arguments.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from knet import typed_config
from knet.typed_config import ConfigFieldError as ConfigFieldError  # re-exported: callers catch it here

Task = Literal["panoptic", "instance", "semantic"]
DecodeHead = Literal["fcn", "psp", "aspp", "uper"]

TASKS: tuple[str, ...] = get_args(Task)
DECODE_HEADS: tuple[str, ...] = get_args(DecodeHead)


_LABEL = "model config"  # errors read "model config key 'update.dropout' must be a float, got None"


def check_field_types(config: Any, section: str) -> None:
    """``knet.typed_config.check_field_types`` with model-config messages (see there for the rules)."""
    typed_config.check_field_types(config, section, label=_LABEL)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _require_positive(owner: str, name: str, value: float) -> None:
    _require(value > 0, f"{owner}.{name} must be > 0, got {value!r}")


def _require_non_negative(owner: str, name: str, value: float) -> None:
    _require(value >= 0, f"{owner}.{name} must be >= 0, got {value!r}")


def _require_probability(owner: str, name: str, value: float) -> None:
    _require(0.0 <= value <= 1.0, f"{owner}.{name} must be in [0, 1], got {value!r}")


@dataclass
class BackboneConfig:
    """A timm feature backbone (4 levels).

    name: a timm model name (resnet18/50/101, swin_*, ...).
    pretrained_path: a local weights file (nothing is downloaded); None = random init.
    frozen_stages: -1 = nothing frozen, 0 = stem, 1 = stem + first stage (the paper), ... up to 4.
    norm_eval: keep BatchNorm running statistics frozen in train mode (the affine parameters still train).
    output_stride: 32 (default) or 8/16 for dilated ResNets (semantic FCN/PSP/ASPP heads).
    drop_path_rate: stochastic depth for transformer backbones (Swin); 0 for ResNets.
    """

    name: str = "resnet50"
    pretrained_path: str | None = None
    frozen_stages: int = 1
    norm_eval: bool = True
    output_stride: int = 32
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        check_field_types(self, "backbone")
        _require(bool(self.name), "backbone.name must be a non-empty timm model name, e.g. 'resnet50'")
        _require(
            -1 <= self.frozen_stages <= 4,
            f"backbone.frozen_stages must be in [-1, 4] (-1 = train everything), got {self.frozen_stages}",
        )
        _require(
            self.output_stride in (8, 16, 32),
            f"backbone.output_stride must be 8, 16 or 32, got {self.output_stride}",
        )
        _require(
            0.0 <= self.drop_path_rate < 1.0,
            f"backbone.drop_path_rate must be in [0, 1), got {self.drop_path_rate}",
        )


@dataclass
class KernelUpdateConfig:
    """One kernel update stage (KernelUpdateHead + KernelUpdator), spec section 2.

    updator_channels: the KernelUpdator's width; None = the model's channels. The semantic 512-d heads
    (fcn/psp/aspp) use 256: each kernel is split into 256-d chunks that share the updator (spec section 3).
    """

    conv_kernel_size: int = 1
    feedforward_channels: int = 2048
    num_heads: int = 8
    dropout: float = 0.0
    gate_sigmoid: bool = True
    gate_norm_act: bool = False
    activate_out: bool = False
    num_cls_fcs: int = 1
    num_mask_fcs: int = 1
    hard_mask_thr: float = 0.5
    updator_channels: int | None = None

    def __post_init__(self) -> None:
        check_field_types(self, "update")
        _require(
            self.conv_kernel_size >= 1 and self.conv_kernel_size % 2 == 1,
            f"update.conv_kernel_size must be a positive odd number (1, 3, ...), got {self.conv_kernel_size}",
        )
        _require_positive("update", "feedforward_channels", self.feedforward_channels)
        _require_positive("update", "num_heads", self.num_heads)
        _require(0.0 <= self.dropout < 1.0, f"update.dropout must be in [0, 1), got {self.dropout}")
        _require_non_negative("update", "num_cls_fcs", self.num_cls_fcs)
        _require_non_negative("update", "num_mask_fcs", self.num_mask_fcs)
        _require_probability("update", "hard_mask_thr", self.hard_mask_thr)
        if self.updator_channels is not None:
            _require_positive("update", "updator_channels", self.updator_channels)


@dataclass
class LossConfig:
    """Loss weights (spec sections 2-3). rank_weight applies to panoptic only (the instance model has
    none). seg_weight: the kernel head's dense semantic focal loss (panoptic/instance), or the CE on every
    logit map of the semantic variant; aux_weight: the semantic variant's auxiliary FCN head."""

    cls_weight: float = 2.0
    mask_weight: float = 1.0
    dice_weight: float = 4.0
    rank_weight: float = 0.1
    seg_weight: float = 1.0
    aux_weight: float = 0.4

    def __post_init__(self) -> None:
        check_field_types(self, "loss")
        for name in ("cls_weight", "mask_weight", "dice_weight", "rank_weight", "seg_weight", "aux_weight"):
            _require_non_negative("loss", name, getattr(self, name))


@dataclass
class MatcherConfig:
    """Hungarian matching cost weights (FocalLossCost, DiceCost, MaskCost)."""

    cls_cost: float = 2.0
    dice_cost: float = 4.0
    mask_cost: float = 1.0

    def __post_init__(self) -> None:
        check_field_types(self, "matcher")
        for name in ("cls_cost", "dice_cost", "mask_cost"):
            _require_non_negative("matcher", name, getattr(self, name))


@dataclass
class InferenceConfig:
    """Post-processing (spec section 4). Only the settings the reference actually reads."""

    max_per_image: int = 100
    mask_thr: float = 0.5
    instance_score_thr: float = 0.3
    overlap_thr: float = 0.6
    panoptic_on: bool = True
    instance_on: bool = True
    semantic_on: bool = True

    def __post_init__(self) -> None:
        check_field_types(self, "inference")
        _require_positive("inference", "max_per_image", self.max_per_image)
        _require_probability("inference", "mask_thr", self.mask_thr)
        _require_probability("inference", "instance_score_thr", self.instance_score_thr)
        _require_probability("inference", "overlap_thr", self.overlap_thr)


# The ImageNet backbone each reference starts from: mmdet's K-Net uses torchvision's ResNet-50 (7x7 stem,
# ``torchvision://resnet50``), mmseg's K-Net a ResNetV1c (deep 3x3 stem, ``open-mmlab://resnet50_v1c``),
# which is timm's ``resnet50c``.
REFERENCE_BACKBONES: dict[str, str] = {
    "panoptic": "resnet50",
    "instance": "resnet50",
    "semantic": "resnet50c",
}

_NESTED: dict[str, type] = {
    "backbone": BackboneConfig,
    "update": KernelUpdateConfig,
    "loss": LossConfig,
    "matcher": MatcherConfig,
    "inference": InferenceConfig,
}


@dataclass
class KNetConfig:
    """The whole K-Net model. Defaults = the paper's COCO panoptic ResNet-50 model.

    channels: C, the width of the FPN, the localization FPN, the kernels and the update heads
      (GroupNorm(32) is used, so it must be a multiple of 32).
    num_proposals: N thing kernels (panoptic adds one kernel per stuff class).
    decode_head / aux_head: the semantic variant's kernel-generating head and auxiliary FCN head; there
      ``channels`` is the decode head's width and the kernels are one per class (num_proposals unused).
    size_divisor: training images are zero-padded (bottom/right) to a multiple of it.
    test_size_divisor: the same at test time; 1 = no padding. The references differ: mmdet's K-Net test
      pipeline pads to 32 (panoptic/instance: their stride-8 localization FPN needs it), mmseg's runs each
      semantic image unpadded (the ``for_task("semantic")`` preset sets 1). Padding changes the semantic
      labels near the image border, so an mmseg checkpoint scores its published mIoU only unpadded.
    """

    task: Task = "panoptic"
    num_thing_classes: int = 80
    num_stuff_classes: int = 53
    num_proposals: int = 100
    num_stages: int = 3
    channels: int = 256
    size_divisor: int = 32
    test_size_divisor: int = 32
    decode_head: DecodeHead = "uper"
    aux_head: bool = True
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    update: KernelUpdateConfig = field(default_factory=KernelUpdateConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    matcher: MatcherConfig = field(default_factory=MatcherConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def __post_init__(self) -> None:
        check_field_types(self, "")
        _require_non_negative("config", "num_thing_classes", self.num_thing_classes)
        _require_non_negative("config", "num_stuff_classes", self.num_stuff_classes)
        if self.task == "instance":
            _require(self.num_thing_classes > 0, "num_thing_classes must be > 0 for task 'instance'")
            _require(
                self.num_stuff_classes == 0,
                f"num_stuff_classes must be 0 for task 'instance' (got {self.num_stuff_classes}); "
                "use task 'panoptic' to segment stuff",
            )
        if self.task == "panoptic":
            _require(self.num_thing_classes > 0, "num_thing_classes must be > 0 for task 'panoptic'")
        if self.task == "semantic":
            _require(
                self.num_thing_classes + self.num_stuff_classes >= 2,
                "num_thing_classes + num_stuff_classes must be >= 2 for task 'semantic' "
                "(softmax grouping needs at least two kernels)",
            )
        _require_positive("config", "num_proposals", self.num_proposals)
        _require_positive("config", "num_stages", self.num_stages)
        _require(
            self.channels > 0 and self.channels % 32 == 0,
            f"channels must be a positive multiple of 32 (GroupNorm uses 32 groups), got {self.channels}",
        )
        _require(
            self.channels % self.update.num_heads == 0,
            f"channels ({self.channels}) must be divisible by update.num_heads ({self.update.num_heads})",
        )
        updator = self.update.updator_channels
        _require(
            updator is None or self.channels % updator == 0,
            f"update.updator_channels ({updator}) must divide channels ({self.channels})",
        )
        if self.task != "semantic":
            _require(
                self.backbone.output_stride == 32,
                f"backbone.output_stride {self.backbone.output_stride} is for the semantic decode heads; "
                f"task {self.task!r} needs 32 (the FPN expects strides 4-32)",
            )
        _require(
            self.size_divisor > 0 and self.size_divisor % 32 == 0,
            f"size_divisor must be a positive multiple of 32 (the backbone's stride), got {self.size_divisor}",
        )
        self._check_test_size_divisor()

    def _check_test_size_divisor(self) -> None:
        """Semantic: any divisor >= 1 (its decode heads resize between levels); panoptic/instance: a
        multiple of 32, because the localization FPN adds x2-upsampled stride-32 maps to stride-8 ones."""
        divisor = self.test_size_divisor
        if self.task == "semantic":
            _require(divisor >= 1, f"test_size_divisor must be >= 1 (1 = no padding), got {divisor}")
        else:
            _require(
                divisor > 0 and divisor % 32 == 0,
                f"test_size_divisor must be a positive multiple of 32 for task {self.task!r} (its "
                f"localization FPN needs input sizes divisible by 32), got {divisor}",
            )

    @property
    def num_classes(self) -> int:
        """Classes the classifier predicts: T for instance, T + S for panoptic and semantic."""
        if self.task == "instance":
            return self.num_thing_classes
        return self.num_thing_classes + self.num_stuff_classes

    # ---- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-safe nested dicts."""
        return typed_config.plain_fields(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KNetConfig:
        """Strict (``knet.typed_config.build``): an unknown key, a value of the wrong type or a section
        that is not a mapping raises ConfigFieldError (a ValueError) naming its dotted key; an unknown
        key's message suggests the closest known key."""
        return typed_config.build(cls, data, label=_LABEL)

    # ---- presets --------------------------------------------------------------------------

    @classmethod
    def for_task(
        cls,
        task: Task,
        *,
        num_thing_classes: int,
        num_stuff_classes: int,
        backbone: str | dict[str, Any] | None = None,
        **overrides: Any,
    ) -> KNetConfig:
        """The paper's settings for ``task`` with the given class counts; ``overrides`` are top-level
        fields (nested sections as dicts or config objects), e.g. ``num_proposals=50``,
        ``update={"conv_kernel_size": 3}``. ``backbone`` is a timm name or a backbone section
        (``{"name": "resnet18", "frozen_stages": -1}``) merged over the task's preset; None, or a section
        without a name, keeps the reference's backbone (``REFERENCE_BACKBONES``)."""
        _require(task in TASKS, f"task must be one of {TASKS}, got {task!r}")
        data: dict[str, Any] = {
            "task": task,
            "num_thing_classes": num_thing_classes,
            "num_stuff_classes": num_stuff_classes,
            "backbone": {"name": backbone if isinstance(backbone, str) else REFERENCE_BACKBONES[task]},
        }
        if task == "instance":
            data["inference"] = {"panoptic_on": False, "instance_on": True, "semantic_on": False}
        elif task == "semantic":
            # Semantic R50 (mmseg): BN is trained, nothing frozen; the ResNet runs undilated for UPerNet
            # (256 channels) and dilated to output stride 8 for the 512-d FCN/PSP/ASPP heads, whose
            # update stages run a 256-d KernelUpdator on kernel halves (spec section 3). mmseg tests
            # every image unpadded (its test pipeline has no Pad), mmdet's K-Net pads to 32.
            data["backbone"].update({"frozen_stages": -1, "norm_eval": False})
            data["test_size_divisor"] = 1
            data["inference"] = {"panoptic_on": False, "instance_on": False, "semantic_on": True}
            if overrides.get("decode_head", "uper") != "uper":
                data["backbone"]["output_stride"] = 8
                if "channels" not in overrides:  # another width: the updator runs at that width
                    data["channels"] = 512
                    data["update"] = {"updator_channels": 256}
        if isinstance(backbone, dict):
            overrides = {**overrides, "backbone": backbone}
        for key, value in overrides.items():
            if key in _NESTED and isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            elif key in _NESTED and dataclasses.is_dataclass(value):
                data[key] = dataclasses.asdict(value)
            else:
                data[key] = value
        return cls.from_dict(data)

    @classmethod
    def coco_panoptic_r50(cls) -> KNetConfig:
        """knet_s3_r50_fpn_1x_coco-panoptic: 80 things + 53 stuff, 100 proposals, 3 stages."""
        return cls.for_task("panoptic", num_thing_classes=80, num_stuff_classes=53)

    @classmethod
    def coco_instance_r50(cls) -> KNetConfig:
        """knet_s3_r50_fpn_1x_coco: 80 things, no stuff kernels, no rank loss."""
        return cls.for_task("instance", num_thing_classes=80, num_stuff_classes=0)

    @classmethod
    def ade20k_semantic_upernet_r50(cls) -> KNetConfig:
        """The original K-Net's knet_s3_upernet_r50 on ADE20K (ZwwWayne/K-Net, 43.6 mIoU): 150 class
        kernels, a 256-channel UPerNet decode head and 256-d stages, aux FCN head, on a ResNetV1c (deep
        stem: timm's resnet50c). Its released checkpoint has these widths (docs/model-presets.md)."""
        return cls.for_task(
            "semantic",
            num_thing_classes=0,
            num_stuff_classes=150,
            backbone="resnet50c",
            decode_head="uper",
            aux_head=True,
        )

    @classmethod
    def ade20k_semantic_upernet_r50_mmseg(cls) -> KNetConfig:
        """mmsegmentation's re-trained K-Net UPerNet R-50 (knet-s3_r50-d8_upernet_8xb2-adamw-80k_ade20k,
        43.45 mIoU): the same model at 512 channels (UPerNet, kernels, attention, FFN and mask FCs) with
        a 256-d KernelUpdator run on kernel halves, as in mmseg's checkpoint; aux head 256 channels."""
        return cls.for_task(
            "semantic",
            num_thing_classes=0,
            num_stuff_classes=150,
            backbone="resnet50c",
            decode_head="uper",
            aux_head=True,
            channels=512,
            update={"updator_channels": 256},
        )

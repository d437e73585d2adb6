"""State-dict key names: the reference K-Net's (official mmdet 2.x, mmsegmentation) <-> ours.

A rule maps a reference key prefix to one of ours; the rest of the key (``weight``, ``running_mean``,
``layer1.0.conv1.weight`` ...) is kept. ``{i}`` in a prefix stands for a module index and is carried
over. Rules are tried in order, the first whose prefix matches wins, so specific prefixes come first;
the same list read right-to-left maps our names back (``to_reference``), which is how a test writes
a checkpoint the way a released one holds it. Every rule renames only: no tensor is reshaped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

Format = Literal["official-knet", "mmseg-knet"]
FORMATS: tuple[str, ...] = get_args(Format)

Rule = tuple[str, str]  # (reference prefix, our prefix)


def _conv_module(reference: str, ours: str, norm: str) -> list[Rule]:
    """mmcv ConvModule (``.conv`` + ``.gn``/``.bn``) -> our Sequential(conv, norm, relu) (``.0``, ``.1``)."""
    return [(f"{reference}.conv.", f"{ours}.0."), (f"{reference}.{norm}.", f"{ours}.1.")]


def _backbone(deep_stem: bool) -> list[Rule]:
    """mmcv ResNet -> timm ResNet (torchvision names). ResNetV1c/d's deep stem is ``stem.0..7`` there
    and ``conv1.0..6`` + ``bn1`` in timm; everything else keeps its name."""
    stem = [("backbone.stem.7.", "backbone.body.bn1.")]
    stem += [(f"backbone.stem.{k}.", f"backbone.body.conv1.{k}.") for k in (0, 1, 3, 4, 6)]
    return [*(stem if deep_stem else []), ("backbone.", "backbone.body.")]


def _stage(reference: str) -> list[Rule]:
    """One KernelUpdateHead (the same module names in both reference code bases)."""
    kept = ("attention_norm", "kernel_update_conv", "ffn_norm", "cls_fcs", "fc_cls", "mask_fcs", "fc_mask")
    return [
        (f"{reference}.{{i}}.attention.attn.", "stages.{i}.attention."),
        (f"{reference}.{{i}}.feat_transform.conv.", "stages.{i}.feat_transform."),
        (f"{reference}.{{i}}.ffn.layers.0.0.", "stages.{i}.ffn.0."),  # Linear, ReLU, Dropout
        (f"{reference}.{{i}}.ffn.layers.1.", "stages.{i}.ffn.3."),
        *((f"{reference}.{{i}}.{name}.", f"stages.{{i}}.{name}.") for name in kept),
    ]


def _official_rules(deep_stem: bool) -> list[Rule]:
    fpn = "rpn_head.localization_fpn"
    ours = "kernel_head.localization_fpn"
    levels = [("0.conv0", "0"), ("1.conv0", "1"), ("2.conv0", "2.0"), ("2.conv1", "2.2")]
    levels += [("3.conv0", "3.0"), ("3.conv1", "3.2"), ("3.conv2", "3.4")]  # conv, upsample, conv, ...
    rules = _backbone(deep_stem) + [
        ("neck.lateral_convs.{i}.conv.", "neck.lateral_convs.{i}."),
        ("neck.fpn_convs.{i}.conv.", "neck.output_convs.{i}."),
    ]
    for reference, index in levels:
        rules += _conv_module(f"{fpn}.convs_all_levels.{reference}", f"{ours}.level_convs.{index}", "gn")
    rules += _conv_module(f"{fpn}.conv_pred", f"{ours}.conv_pred", "gn")
    rules += _conv_module(f"{fpn}.aux_convs.0", f"{ours}.aux_conv", "gn")
    rules += _conv_module("rpn_head.loc_convs.0", "kernel_head.loc_convs", "gn")
    rules += _conv_module("rpn_head.seg_convs.0", "kernel_head.seg_convs", "gn")
    rules += [
        ("rpn_head.init_kernels.", "kernel_head.init_kernels."),
        ("rpn_head.conv_seg.", "kernel_head.conv_seg."),
    ]
    return rules + _stage("roi_head.mask_head")


def _decode_head_rules(decode_head: str) -> list[Rule]:
    """mmseg's kernel_generate_head -> our SemanticKernelHead.decode_head (knet/decode_heads.py)."""
    ref, ours = "decode_head.kernel_generate_head", "kernel_head.decode_head"
    pyramid = _conv_module(f"{ref}.psp_modules.{{i}}.1", f"{ours}.pyramid.branches.{{i}}.1", "bn")
    if decode_head == "fcn":
        return _conv_module(f"{ref}.convs.{{i}}", f"{ours}.convs.{{i}}", "bn") + _conv_module(
            f"{ref}.conv_cat", f"{ours}.conv_cat", "bn"
        )
    if decode_head == "psp":
        return pyramid + _conv_module(f"{ref}.bottleneck", f"{ours}.bottleneck", "bn")
    if decode_head == "aspp":
        return [
            *_conv_module(f"{ref}.image_pool.1", f"{ours}.image_pool.1", "bn"),
            *_conv_module(f"{ref}.aspp_modules.{{i}}", f"{ours}.branches.{{i}}", "bn"),
            *_conv_module(f"{ref}.bottleneck", f"{ours}.bottleneck", "bn"),
        ]
    if decode_head == "uper":  # mmseg's UPerHead calls its PSP bottleneck just "bottleneck"
        return [
            *pyramid,
            *_conv_module(f"{ref}.bottleneck", f"{ours}.psp_bottleneck", "bn"),
            *_conv_module(f"{ref}.lateral_convs.{{i}}", f"{ours}.lateral_convs.{{i}}", "bn"),
            *_conv_module(f"{ref}.fpn_convs.{{i}}", f"{ours}.fpn_convs.{{i}}", "bn"),
            *_conv_module(f"{ref}.fpn_bottleneck", f"{ours}.fpn_bottleneck", "bn"),
        ]
    raise ValueError(f"decode_head must be one of 'fcn', 'psp', 'aspp', 'uper', got {decode_head!r}")


def _mmseg_rules(deep_stem: bool, decode_head: str) -> list[Rule]:
    return [
        *_backbone(deep_stem),
        ("decode_head.kernel_generate_head.conv_seg.", "kernel_head.conv_seg."),
        *_decode_head_rules(decode_head),
        *_conv_module("auxiliary_head.convs.{i}", "kernel_head.aux_head.0.convs.{i}", "bn"),
        ("auxiliary_head.conv_seg.", "kernel_head.aux_head.2."),
        *_stage("decode_head.kernel_update_head"),
    ]


def _pattern(prefix: str) -> re.Pattern[str]:
    return re.compile(re.escape(prefix).replace(r"\{i\}", r"(?P<i>\d+)"))


@dataclass(frozen=True)
class KeyMap:
    """The rules of one reference layout; ``to_ours`` / ``to_reference`` give None for a key no rule
    covers (such a key is reported, never dropped)."""

    rules: tuple[Rule, ...]

    def to_ours(self, key: str) -> str | None:
        return _apply(self.rules, key, reverse=False)

    def to_reference(self, key: str) -> str | None:
        return _apply(self.rules, key, reverse=True)


def _apply(rules: tuple[Rule, ...], key: str, *, reverse: bool) -> str | None:
    for reference, ours in rules:
        source, target = (ours, reference) if reverse else (reference, ours)
        match = _pattern(source).match(key)
        if match is not None:
            index = match.groupdict().get("i")
            return target.replace("{i}", index or "") + key[match.end() :]
    return None


def key_map(format: Format, *, deep_stem: bool, decode_head: str | None = None) -> KeyMap:
    """The rules for ``format``; ``deep_stem``: a ResNetV1c/d stem; ``decode_head``: mmseg's head kind."""
    if format == "official-knet":
        return KeyMap(tuple(_official_rules(deep_stem)))
    if format == "mmseg-knet":
        if decode_head is None:
            raise ValueError("the mmseg-knet key map needs the decode head kind")
        return KeyMap(tuple(_mmseg_rules(deep_stem, decode_head)))
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}")

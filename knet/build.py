"""``build_model(cfg)``: the only place a ``KNetConfig`` meets module constructors."""

from __future__ import annotations

from knet.backbone import TimmBackbone
from knet.config import KNetConfig
from knet.criterion import KNetCriterion
from knet.kernel_head import ConvKernelHead
from knet.kernel_update import KernelUpdateHead
from knet.matcher import HungarianMatcher
from knet.model import Criterion, KNet, PostProcessor
from knet.neck import FPN
from knet.postprocess import PostProcessor as KNetPostProcessor


def build_backbone(cfg: KNetConfig) -> TimmBackbone:
    b = cfg.backbone
    return TimmBackbone(
        name=b.name,
        pretrained_path=b.pretrained_path,
        frozen_stages=b.frozen_stages,
        norm_eval=b.norm_eval,
        output_stride=b.output_stride,
        drop_path_rate=b.drop_path_rate,
    )


def build_kernel_head(cfg: KNetConfig) -> ConvKernelHead:
    """Instance: conv_seg covers the T thing classes only; panoptic: T + S and S stuff kernels."""
    return ConvKernelHead(
        channels=cfg.channels,
        num_proposals=cfg.num_proposals,
        num_thing_classes=cfg.num_thing_classes,
        num_stuff_classes=cfg.num_stuff_classes if cfg.task == "panoptic" else 0,
        conv_kernel_size=cfg.update.conv_kernel_size,
        hard_mask_thr=cfg.update.hard_mask_thr,
    )


def build_stage(cfg: KNetConfig) -> KernelUpdateHead:
    u = cfg.update
    return KernelUpdateHead(
        num_classes=cfg.num_classes,
        channels=cfg.channels,
        conv_kernel_size=u.conv_kernel_size,
        feedforward_channels=u.feedforward_channels,
        num_heads=u.num_heads,
        dropout=u.dropout,
        num_cls_fcs=u.num_cls_fcs,
        num_mask_fcs=u.num_mask_fcs,
        grouping="hard_sigmoid",
        hard_mask_thr=u.hard_mask_thr,
        gate_sigmoid=u.gate_sigmoid,
        gate_norm_act=u.gate_norm_act,
        activate_out=u.activate_out,
    )


def build_model(cfg: KNetConfig) -> KNet:
    """A K-Net for ``cfg.task`` ("panoptic" or "instance"; the semantic variant is built elsewhere)."""
    _check_task(cfg)
    return assemble_model(cfg, criterion=build_criterion(cfg), postprocessor=build_postprocessor(cfg))


def assemble_model(cfg: KNetConfig, *, criterion: Criterion, postprocessor: PostProcessor) -> KNet:
    """The network from ``cfg`` with the given loss and post-processing callables (see ``KNet``)."""
    _check_task(cfg)
    backbone = build_backbone(cfg)
    return KNet(
        backbone=backbone,
        neck=FPN(in_channels=backbone.channels, out_channels=cfg.channels),
        kernel_head=build_kernel_head(cfg),
        stages=[build_stage(cfg) for _ in range(cfg.num_stages)],
        criterion=criterion,
        postprocessor=postprocessor,
        num_classes=cfg.num_classes,
        size_divisor=cfg.size_divisor,
    )


def build_criterion(cfg: KNetConfig) -> Criterion:
    """K-Net's losses with one Hungarian matcher shared by the RPN and every stage."""
    panoptic = cfg.task == "panoptic"
    return KNetCriterion(
        num_thing_classes=cfg.num_thing_classes,
        num_stuff_classes=cfg.num_stuff_classes if panoptic else 0,
        num_proposals=cfg.num_proposals,
        panoptic=panoptic,
        matcher=HungarianMatcher(
            cls_cost=cfg.matcher.cls_cost, dice_cost=cfg.matcher.dice_cost, mask_cost=cfg.matcher.mask_cost
        ),
        cls_weight=cfg.loss.cls_weight,
        mask_weight=cfg.loss.mask_weight,
        dice_weight=cfg.loss.dice_weight,
        rank_weight=cfg.loss.rank_weight,
        seg_weight=cfg.loss.seg_weight,
        use_rank_loss=panoptic,  # the instance model has no rank loss (spec section 3)
    )


def build_postprocessor(cfg: KNetConfig) -> PostProcessor:
    """Predictions from the last stage's logits (panoptic merge / instance top-k / semantic map)."""
    inference = cfg.inference
    return KNetPostProcessor(
        task=cfg.task,
        num_thing_classes=cfg.num_thing_classes,
        num_stuff_classes=cfg.num_stuff_classes if cfg.task == "panoptic" else 0,
        num_proposals=cfg.num_proposals,
        max_per_image=inference.max_per_image,
        mask_thr=inference.mask_thr,
        instance_score_thr=inference.instance_score_thr,
        overlap_thr=inference.overlap_thr,
        panoptic_on=inference.panoptic_on,
        instance_on=inference.instance_on,
        semantic_on=inference.semantic_on,
    )


def _check_task(cfg: KNetConfig) -> None:
    if cfg.task == "semantic":
        raise NotImplementedError(
            "semantic K-Net (decode heads fcn/psp/aspp/uper) is not implemented yet; use task 'panoptic' or 'instance'"
        )
    if cfg.backbone.output_stride != 32:
        raise ValueError(
            f"backbone.output_stride {cfg.backbone.output_stride} is for the semantic decode heads; "
            "panoptic/instance K-Net needs 32 (the FPN expects strides 4-32)"
        )

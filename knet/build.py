"""``build_model(cfg)``: the only place a ``KNetConfig`` meets module constructors."""

from __future__ import annotations

from torch import nn

from knet.backbone import TimmBackbone
from knet.config import KNetConfig
from knet.criterion import KNetCriterion
from knet.kernel_head import ConvKernelHead
from knet.matcher import HungarianMatcher
from knet.model import Criterion, KNet, PostProcessor
from knet.neck import FPN
from knet.postprocess import PostProcessor as KNetPostProcessor
from knet.semantic_head import SemanticKernelHead
from knet.semantic_loss import SemanticCriterion
from knet.semantic_postprocess import SemanticPostProcessor
from knet.update_stage import KernelUpdateHead


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
    """Panoptic/instance: hard sigmoid grouping + a classifier; semantic: softmax grouping, no classifier
    (each kernel keeps its class)."""
    u = cfg.update
    semantic = cfg.task == "semantic"
    return KernelUpdateHead(
        num_classes=None if semantic else cfg.num_classes,
        channels=cfg.channels,
        conv_kernel_size=u.conv_kernel_size,
        feedforward_channels=u.feedforward_channels,
        num_heads=u.num_heads,
        dropout=u.dropout,
        num_cls_fcs=u.num_cls_fcs,
        num_mask_fcs=u.num_mask_fcs,
        grouping="softmax" if semantic else "hard_sigmoid",
        hard_mask_thr=u.hard_mask_thr,
        updator_channels=u.updator_channels,
        gate_sigmoid=u.gate_sigmoid,
        gate_norm_act=u.gate_norm_act,
        activate_out=u.activate_out,
    )


def build_model(cfg: KNetConfig) -> KNet:
    """A K-Net for ``cfg.task``: panoptic, instance, or semantic (a decode head's class kernels)."""
    return assemble_model(cfg, criterion=build_criterion(cfg), postprocessor=build_postprocessor(cfg))


def assemble_model(cfg: KNetConfig, *, criterion: Criterion, postprocessor: PostProcessor) -> KNet:
    """The network from ``cfg`` with the given loss and post-processing callables (see ``KNet``).

    Panoptic/instance: backbone -> FPN -> ConvKernelHead -> stages. Semantic: backbone -> decode head
    (its classifier gives the kernels; no neck) -> stages.
    """
    backbone = build_backbone(cfg)
    if cfg.task == "semantic":
        neck: nn.Module = nn.Identity()
        kernel_head: nn.Module = SemanticKernelHead(
            decode_head=cfg.decode_head,
            in_channels=backbone.channels,
            channels=cfg.channels,
            num_classes=cfg.num_classes,
            conv_kernel_size=cfg.update.conv_kernel_size,
            aux_head=cfg.aux_head,
        )
    else:
        neck = FPN(in_channels=backbone.channels, out_channels=cfg.channels)
        kernel_head = build_kernel_head(cfg)
    return KNet(
        backbone=backbone,
        neck=neck,
        kernel_head=kernel_head,
        stages=[build_stage(cfg) for _ in range(cfg.num_stages)],
        criterion=criterion,
        postprocessor=postprocessor,
        num_classes=cfg.num_classes,
        size_divisor=cfg.size_divisor,
        test_size_divisor=cfg.test_size_divisor,
    )


def build_criterion(cfg: KNetConfig) -> Criterion:
    """K-Net's losses with one Hungarian matcher shared by the RPN and every stage (semantic: CE on
    every logit map, no matching)."""
    if cfg.task == "semantic":
        return SemanticCriterion(
            num_classes=cfg.num_classes, seg_weight=cfg.loss.seg_weight, aux_weight=cfg.loss.aux_weight
        )
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
    if cfg.task == "semantic":
        return SemanticPostProcessor()
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

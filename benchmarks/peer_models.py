"""Builders for the benchmark cases: each returns a closure that runs one step (train or inference).

All models are randomly initialised (nothing is downloaded) and configured the way the issue asks:
K-Net R50 with 100 proposals and 3 stages (panoptic adds 53 stuff kernels), HF Mask2Former with a
ResNet-50 backbone and 100 queries, torchvision Mask R-CNN R50-FPN with its score threshold at 0 so it
post-processes 100 detections as a trained model would and min/max size pinned to the benchmark size (it
would otherwise resize to 800), and timm's ResNet-50 features as the floor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

StepFn = Callable[[], None]


@dataclass
class Case:
    """One benchmark case: ``step()`` runs one train step or one inference call of ``model``."""

    step: StepFn
    model: torch.nn.Module


CASES = (
    "knet_panoptic_train",
    "knet_panoptic_infer",
    "knet_instance_infer",
    "mask2former_train",
    "mask2former_infer",
    "maskrcnn_infer",
    "backbone_train",
    "backbone_infer",
)

NUM_THINGS, NUM_STUFF = 80, 53


def maskrcnn_sizes(size: tuple[int, int]) -> tuple[int, int]:
    """torchvision's (min_size, max_size) that keep a ``size`` input at its size (default: resize to 800)."""
    return min(size), max(size)


def import_libraries(name: str) -> None:
    """Import what ``name`` builds on, so a memory probe can take its baseline without the imports."""
    import timm  # noqa: F401  (K-Net's backbone and the floor)

    if name.startswith("knet"):
        import knet  # noqa: F401
    elif name.startswith("mask2former"):
        from transformers import Mask2FormerForUniversalSegmentation  # noqa: F401
    elif name.startswith("maskrcnn"):
        from torchvision.models.detection import maskrcnn_resnet50_fpn  # noqa: F401


def build_case(name: str, *, size: tuple[int, int], batch: int, device: torch.device, amp: bool) -> Case:
    builders: dict[str, Callable[[], Case]] = {
        "knet_panoptic_train": lambda: _knet(size, batch, device, amp, task="panoptic", train=True),
        "knet_panoptic_infer": lambda: _knet(size, batch, device, amp, task="panoptic", train=False),
        "knet_instance_infer": lambda: _knet(size, batch, device, amp, task="instance", train=False),
        "mask2former_train": lambda: _mask2former(size, batch, device, amp, train=True),
        "mask2former_infer": lambda: _mask2former(size, batch, device, amp, train=False),
        "maskrcnn_infer": lambda: _maskrcnn(size, batch, device, amp),
        "backbone_train": lambda: _backbone(size, batch, device, amp, train=True),
        "backbone_infer": lambda: _backbone(size, batch, device, amp, train=False),
    }
    if name not in builders:
        raise ValueError(f"unknown benchmark case {name!r}; choose from {sorted(builders)}")
    return builders[name]()


def synthetic_targets(
    size: tuple[int, int], batch: int, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """Per image: 6 rectangular thing instances and 3 horizontal stuff bands (fixed, so every case sees the same)."""
    height, width = size
    targets = []
    for image in range(batch):
        masks, labels = [], []
        for band, label in enumerate((NUM_THINGS, NUM_THINGS + 7, NUM_THINGS + 20)):
            mask = torch.zeros(height, width, dtype=torch.bool)
            mask[band * height // 3 : (band + 1) * height // 3] = True
            masks.append(mask)
            labels.append(label)
        for index in range(6):
            mask = torch.zeros(height, width, dtype=torch.bool)
            top, left = (index * 37 + image * 11) % (height // 2), (index * 53) % (width // 2)
            mask[top : top + height // 4, left : left + width // 5] = True
            masks.append(mask)
            labels.append((index * 13) % NUM_THINGS)
        # things are drawn over stuff: stuff keeps only the pixels no thing covers
        thing_union = torch.stack(masks[3:]).any(0)
        for band in range(3):
            masks[band] &= ~thing_union
        targets.append(
            {"labels": torch.tensor(labels, device=device), "masks": torch.stack(masks).to(device)}
        )
    return targets


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device.type, dtype=torch.float16) if amp else contextlib.nullcontext()


def _train_step(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], device, amp) -> Case:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            loss = loss_fn()
        loss.backward()
        optimizer.step()

    return Case(step, model)


def _infer_step(model: torch.nn.Module, forward: Callable[[], object], device, amp) -> Case:
    model.eval()

    def step() -> None:
        with torch.no_grad(), _autocast(device, amp):
            forward()

    return Case(step, model)


def _knet(size, batch, device, amp, *, task: str, train: bool) -> Case:
    from knet import KNetConfig, build_model

    stuff = NUM_STUFF if task == "panoptic" else 0
    cfg = KNetConfig.for_task(
        task, num_thing_classes=NUM_THINGS, num_stuff_classes=stuff, backbone="resnet50"
    )
    model = build_model(cfg).to(device)
    images = torch.randn(batch, 3, *size, device=device)
    if not train:
        return _infer_step(model, lambda: model(images), device, amp)
    targets = synthetic_targets(size, batch, device)
    return _train_step(model, lambda: sum(model(images, targets).values()), device, amp)


def _mask2former(size, batch, device, amp, *, train: bool) -> Case:
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # it warns that ResNet is not its default backbone; that is the point
    backbone = ResNetConfig(
        depths=[3, 4, 6, 3],
        hidden_sizes=[256, 512, 1024, 2048],
        layer_type="bottleneck",
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    config = Mask2FormerConfig(backbone_config=backbone, num_queries=100, num_labels=NUM_THINGS + NUM_STUFF)
    model = Mask2FormerForUniversalSegmentation(config).to(device)
    images = torch.randn(batch, 3, *size, device=device)
    if not train:
        return _infer_step(model, lambda: model(pixel_values=images), device, amp)
    targets = synthetic_targets(size, batch, device)
    mask_labels = [t["masks"].float() for t in targets]
    class_labels = [t["labels"] for t in targets]
    return _train_step(
        model,
        lambda: model(pixel_values=images, mask_labels=mask_labels, class_labels=class_labels).loss,
        device,
        amp,
    )


def _maskrcnn(size, batch, device, amp) -> Case:
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    min_size, max_size = maskrcnn_sizes(size)
    model = maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        box_score_thresh=0.0,
        box_detections_per_img=100,
        min_size=min_size,
        max_size=max_size,
        num_classes=NUM_THINGS + 1,
    ).to(device)
    images = [torch.rand(3, *size, device=device) for _ in range(batch)]
    return _infer_step(model, lambda: model(images), device, amp)


def _backbone(size, batch, device, amp, *, train: bool) -> Case:
    import timm

    model = timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=(1, 2, 3, 4)).to(
        device
    )
    images = torch.randn(batch, 3, *size, device=device)
    if not train:
        return _infer_step(model, lambda: model(images), device, amp)
    return _train_step(model, lambda: sum(f.float().mean() for f in model(images)), device, amp)

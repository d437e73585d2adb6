"""Parameter counts equal the spec's fingerprints (knet-spec.md section 6)."""

from __future__ import annotations

import pytest

from knet import KNetConfig, build_model
from knet.kernel_updator import KernelUpdator
from knet.update_stage import KernelUpdateHead


def _count(module) -> int:  # noqa: ANN001
    return sum(p.numel() for p in module.parameters())


def _paper_stage(num_classes: int) -> KernelUpdateHead:
    return KernelUpdateHead(
        num_classes=num_classes,
        channels=256,
        conv_kernel_size=1,
        feedforward_channels=2048,
        num_heads=8,
        dropout=0.0,
        num_cls_fcs=1,
        num_mask_fcs=1,
        grouping="hard_sigmoid",
        hard_mask_thr=0.5,
    )


def test_kernel_updator_has_463104_parameters() -> None:
    assert _count(KernelUpdator(channels=256)) == 463_104


def test_panoptic_stage_has_2076037_parameters() -> None:
    assert _count(_paper_stage(133)) == 2_076_037


def test_instance_stage_has_2062416_parameters() -> None:
    assert _count(_paper_stage(80)) == 2_062_416


def _model(task: str, backbone: str):  # noqa: ANN202
    cfg = KNetConfig.for_task(
        task, num_thing_classes=80, num_stuff_classes=53 if task == "panoptic" else 0, backbone=backbone
    )
    return build_model(cfg)


@pytest.mark.parametrize(
    ("task", "backbone", "expected"),
    [
        ("panoptic", "resnet50", 37_536_852),
        ("instance", "resnet50", 37_482_368),
        ("panoptic", "resnet101", 56_528_980),
        ("instance", "resnet101", 56_474_496),
    ],
)
def test_whole_model_matches_the_fingerprint(task: str, backbone: str, expected: int) -> None:
    model = _model(task, backbone)
    assert _count(model) == expected
    assert _count(model.kernel_head) == (4_456_325 if task == "panoptic" else 4_442_704)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == 225_344  # stem + res2, the same in

"""knet.weights.transfer: fine-tuning from a model with other classes loads every tensor outside the
class-specific layers bit-exact, starts those layers afresh, and refuses a model of another shape."""

from __future__ import annotations

import pytest
import torch

from knet import KNetConfig, build_model
from knet.bundle import save_bundle
from knet.data import Category, CategoryTable, TransformConfig
from knet.model import KNet
from knet.weights.transfer import (
    TransferError,
    check_transferable,
    class_specific_layers,
    transfer_from_bundle,
    transfer_weights,
)

TINY = dict(channels=32, num_proposals=4, num_stages=2, update={"feedforward_channels": 64, "num_heads": 4})


def config(task: str = "panoptic", things: int = 3, stuff: int = 2, **overrides: object) -> KNetConfig:
    settings: dict[str, object] = {"backbone": "resnet18", **TINY, **overrides}
    if task == "semantic":
        settings.setdefault("decode_head", "fcn")
    return KNetConfig.for_task(task, num_thing_classes=things, num_stuff_classes=stuff, **settings)


def model(cfg: KNetConfig, seed: int) -> KNet:
    torch.manual_seed(seed)
    return build_model(cfg)


def class_keys(target: KNet) -> set[str]:
    modules = [m for _, members in class_specific_layers(target).values() for m in members]
    return {key for key in target.state_dict() if key.startswith(tuple(f"{m}." for m in modules))}


def test_same_classes_load_every_tensor_bit_exact():
    source, target = model(config(), seed=1), model(config(), seed=2)
    report = transfer_weights(target, source.state_dict())
    assert report.reinitialised == () and set(report.loaded) == set(source.state_dict())
    for key, value in target.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


@pytest.mark.parametrize(
    ("task", "source_counts", "target_counts", "groups"),
    [
        ("panoptic", (80, 53), (3, 2), {"kernel_head.conv_seg": (133, 5), "stages.*.fc_cls": (133, 5)}),
        ("instance", (80, 0), (4, 0), {"kernel_head.conv_seg": (80, 4), "stages.*.fc_cls": (80, 4)}),
        (
            "semantic",
            (0, 150),
            (0, 3),
            {"kernel_head.conv_seg": (150, 3), "kernel_head.aux_head.2": (150, 3)},
        ),
    ],
)
def test_other_classes_start_the_class_layers_afresh_and_load_the_rest_bit_exact(
    task, source_counts, target_counts, groups
):
    source = model(config(task, *source_counts), seed=1)
    target = model(config(task, *target_counts), seed=2)
    fresh = {key: value.clone() for key, value in target.state_dict().items()}
    report = transfer_weights(target, source.state_dict())
    assert {g.name: (g.source_classes, g.target_classes) for g in report.reinitialised} == groups
    reinitialised = {key for group in report.reinitialised for key in group.keys}
    assert reinitialised == class_keys(target) and set(report.loaded) == set(fresh) - reinitialised
    for key, value in target.state_dict().items():
        expected = fresh[key] if key in reinitialised else source.state_dict()[key]
        assert torch.equal(value, expected), key
    assert report.lines()[0].startswith("re-initialised kernel_head.conv_seg (")
    assert (
        f"{source_counts[0] + source_counts[1]} -> {target_counts[0] + target_counts[1]} classes"
        in (report.lines()[0])
    )


def test_the_class_specific_layers_are_exactly_the_tensors_whose_shape_follows_the_class_counts():
    for task, counts in (
        ("panoptic", ((3, 2), (7, 4))),
        ("instance", ((3, 0), (5, 0))),
        ("semantic", ((0, 3), (0, 9))),
    ):
        with torch.device("meta"):
            small, large = (build_model(config(task, *count)) for count in counts)
        shapes = {key: value.shape for key, value in large.state_dict().items()}
        changed = {key for key, value in small.state_dict().items() if value.shape != shapes[key]}
        assert changed == class_keys(small), task


def test_same_counts_with_other_names_start_the_class_layers_afresh(tmp_path):
    source, target = model(config(), seed=1), model(config(), seed=2)
    names = ["a", "b", "c", "d", "e"]
    table = CategoryTable([Category(i + 1, name, i < 3) for i, name in enumerate(names)])
    save_bundle(tmp_path / "same", source, config(), table, TransformConfig())
    assert transfer_from_bundle(target, tmp_path / "same", table).reinitialised == ()
    renamed = CategoryTable([Category(i + 1, name.upper(), i < 3) for i, name in enumerate(names)])
    report = transfer_from_bundle(target, tmp_path / "same", renamed)
    assert [group.line() for group in report.reinitialised] == [
        "re-initialised kernel_head.conv_seg (dense classifier and stuff kernels: 5 -> 5 classes, other names)",
        "re-initialised stages.*.fc_cls (class FCs: 5 -> 5 classes, other names)",
    ]


def test_a_width_mismatch_is_refused_naming_the_keys():
    source, target = model(config(channels=64), seed=1), model(config(), seed=2)
    before = {key: value.clone() for key, value in target.state_dict().items()}
    with pytest.raises(TransferError, match=r"of another shape: neck\.lateral_convs\.0\.weight \[64, 64"):
        transfer_weights(target, source.state_dict())
    assert all(torch.equal(value, before[key]) for key, value in target.state_dict().items())


def test_another_stage_count_or_backbone_is_refused_before_any_weights_are_read():
    with pytest.raises(TransferError, match=r"extra: stages\.2\..*num_stages=3 \(here 2\)"):
        check_transferable(config(num_stages=3), config(things=8))
    with pytest.raises(TransferError, match=r"backbone.name='resnet34' \(here 'resnet18'\)"):
        check_transferable(config(backbone="resnet34"), config())
    with pytest.raises(TransferError, match="a semantic model cannot start a panoptic one"):
        check_transferable(config("semantic", 0, 3), config())
    check_transferable(config(things=80, stuff=53), config("instance", 3, 0))  # classes only: fits

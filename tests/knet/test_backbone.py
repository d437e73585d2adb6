"""The timm backbone: four NCHW levels at strides 4-32, frozen stages and frozen BN statistics."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from knet.backbone import TimmBackbone, count_trainable


def _backbone(name: str = "resnet18", **overrides: object) -> TimmBackbone:
    args: dict[str, object] = dict(
        name=name, pretrained_path=None, frozen_stages=1, norm_eval=True, output_stride=32, drop_path_rate=0.0
    )
    args.update(overrides)
    return TimmBackbone(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["resnet18", "swin_tiny_patch4_window7_224"])
def test_four_nchw_levels_at_strides_4_to_32(name: str) -> None:
    backbone = _backbone(name)
    features = backbone(torch.randn(1, 3, 64, 96))
    assert [f.shape[1] for f in features] == backbone.channels
    assert [tuple(f.shape[-2:]) for f in features] == [(16, 24), (8, 12), (4, 6), (2, 3)]


def test_output_stride_8_dilates_the_last_resnet_stages() -> None:
    features = _backbone(output_stride=8)(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape[-2:]) for f in features] == [(16, 16), (8, 8), (8, 8), (8, 8)]


def test_frozen_stages_1_freezes_exactly_the_stem_and_first_stage() -> None:
    backbone = _backbone()
    body = backbone.body
    expected = sum(p.numel() for m in (body.conv1, body.bn1, body.layer1) for p in m.parameters())
    total = sum(p.numel() for p in backbone.parameters())
    assert total - count_trainable(backbone) == expected
    assert all(not p.requires_grad for p in body.layer1.parameters())
    assert all(p.requires_grad for p in body.layer2.parameters())


def test_norm_eval_freezes_bn_statistics_but_affine_parameters_still_train() -> None:
    backbone = _backbone(frozen_stages=-1).train()
    bn = backbone.body.layer2[0].bn1
    before = bn.running_mean.clone()
    backbone(torch.randn(2, 3, 64, 64) * 5 + 3)
    assert not bn.training and torch.equal(bn.running_mean, before)
    assert bn.weight.requires_grad


def test_without_norm_eval_bn_statistics_update_in_train_mode() -> None:
    backbone = _backbone(frozen_stages=-1, norm_eval=False).train()
    bn = backbone.body.layer2[0].bn1
    before = bn.running_mean.clone()
    backbone(torch.randn(2, 3, 64, 64) * 5 + 3)
    assert bn.training and not torch.equal(bn.running_mean, before)


def test_frozen_stages_stay_in_eval_mode_after_conversion_to_sync_batchnorm() -> None:
    """The platform converts BN to SyncBN for multi-GPU DDP; the frozen stem and first stage must still
    keep their statistics, and the optimizer's parameters must be the same objects."""
    backbone = _backbone(frozen_stages=1, norm_eval=False)
    weight = backbone.body.layer2[0].bn1.weight
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(backbone).train()
    assert converted is backbone and isinstance(backbone.body.bn1, nn.SyncBatchNorm)
    assert not backbone.body.bn1.training and not backbone.body.layer1[0].bn1.training
    assert backbone.body.layer2[0].bn1.training and backbone.body.layer2[0].bn1.weight is weight


def test_unknown_backbone_name_lists_close_timm_names() -> None:
    with pytest.raises(ValueError, match=r"backbone.name 'resnet5O'.*resnet50"):
        _backbone("resnet5O")


def test_missing_pretrained_file_names_the_field(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(FileNotFoundError, match="backbone.pretrained_path"):
        _backbone(pretrained_path=str(tmp_path / "missing.pth"))


def test_pretrained_path_loads_local_weights(tmp_path) -> None:  # noqa: ANN001
    source = _backbone()
    path = tmp_path / "resnet18.pth"
    full = {f"{k}": v for k, v in source.body.state_dict().items()}
    torch.save(full, path)
    loaded = _backbone(pretrained_path=str(path))
    torch.testing.assert_close(loaded.body.layer3[0].conv1.weight, source.body.layer3[0].conv1.weight)
    assert isinstance(loaded.body.layer3[0].conv1, nn.Conv2d)

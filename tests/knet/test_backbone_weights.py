"""backbone.pretrained_path reads the ImageNet weights the references start from, in each layout they are
published in (timm/torchvision, mmcv ResNetV1c, mmpretrain ResNet/ResNetV1c), from real files; it says
which layout it recognised and refuses anything else naming the keys at fault."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from knet.backbone import TimmBackbone
from knet.errors import KnetInputError
from knet.safe_load import UnsafeWeightsError

# The reference layouts' stem names, written out from mmcv's / mmpretrain's ResNet code, against timm's.
MMCV_STEM = {"conv1.0.": "stem.0.", "conv1.1.": "stem.1.", "conv1.3.": "stem.3.", "conv1.4.": "stem.4."}
MMCV_STEM |= {"conv1.6.": "stem.6.", "bn1.": "stem.7."}
MMPRETRAIN_STEM = {"conv1.0.": "stem.0.conv.", "conv1.1.": "stem.0.bn.", "conv1.3.": "stem.1.conv."}
MMPRETRAIN_STEM |= {"conv1.4.": "stem.1.bn.", "conv1.6.": "stem.2.conv.", "bn1.": "stem.2.bn."}


def _renamed(
    state: dict[str, torch.Tensor], table: dict[str, str], prefix: str = ""
) -> dict[str, torch.Tensor]:
    def rename(key: str) -> str:
        for old, new in table.items():
            if key.startswith(old):
                return new + key[len(old) :]
        return key

    return {
        prefix + ("head." + k if k.startswith("fc.") and prefix else rename(k)): v for k, v in state.items()
    }


@pytest.fixture(scope="module")
def v1c() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return timm.create_model("resnet50c").state_dict()


@pytest.fixture(scope="module")
def r50() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return timm.create_model("resnet50").state_dict()


def _load(name: str, path: Path) -> TimmBackbone:
    return TimmBackbone(
        name=name,
        pretrained_path=str(path),
        frozen_stages=1,
        norm_eval=True,
        output_stride=32,
        drop_path_rate=0,
    )


def _assert_loaded(backbone: TimmBackbone, source: dict[str, torch.Tensor]) -> None:
    """Every tensor of the feature model equals the source model's tensor of the same timm name."""
    loaded = backbone.body.state_dict()
    assert len(loaded) > 100
    for key, value in loaded.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, source[key]), key


def _torchvision_file(r50: dict[str, torch.Tensor], path: Path) -> None:
    """torchvision's resnet50-0676ba61.pth: the same names as timm, without BN counters."""
    torch.save({k: v for k, v in r50.items() if not k.endswith("num_batches_tracked")}, path)


def _mmcv_v1c_file(v1c: dict[str, torch.Tensor], path: Path) -> None:
    """open-mmlab://resnet50_v1c: stem.0/1/3/4/6/7 and an ImageNet fc."""
    torch.save(_renamed(v1c, MMCV_STEM), path)


def _mmpretrain_v1c_file(v1c: dict[str, torch.Tensor], path: Path) -> None:
    """mmpretrain's resnetv1c50_8xb32_in1k: {'meta', 'state_dict'}, backbone.stem.N.conv/bn, head.fc."""
    torch.save({"meta": {"epoch": 100}, "state_dict": _renamed(v1c, MMPRETRAIN_STEM, "backbone.")}, path)


def _mmseg_knet_file(v1c: dict[str, torch.Tensor], path: Path) -> None:
    """A whole mmseg K-Net checkpoint: its backbone (mmcv stem) under backbone., plus the heads."""
    state = {"backbone." + k: v for k, v in _renamed(v1c, MMCV_STEM).items() if not k.startswith("fc.")}
    state["decode_head.kernel_generate_head.conv_seg.weight"] = torch.zeros(150, 512, 1, 1)
    torch.save({"meta": {}, "state_dict": state}, path)


def _mmpretrain_r50_file(r50: dict[str, torch.Tensor], path: Path) -> None:
    torch.save({"state_dict": _renamed(r50, {}, "backbone.")}, path)


def _timm_safetensors_file(v1c: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.contiguous() for k, v in v1c.items()}, str(path))


CASES: list[tuple[str, str, str, Callable[..., None], str]] = [
    ("resnet50", "r50", "resnet50-0676ba61.pth", _torchvision_file, "timm/torchvision"),
    ("resnet50", "r50", "resnet50_8xb32_in1k.pth", _mmpretrain_r50_file, "mmpretrain ResNet"),
    ("resnet50c", "v1c", "resnet50c.gluon_in1k.safetensors", _timm_safetensors_file, "timm/torchvision"),
    ("resnet50c", "v1c", "resnet50_v1c-2cccc1ad.pth", _mmcv_v1c_file, "mmcv ResNetV1c"),
    ("resnet50c", "v1c", "resnetv1c50_8xb32_in1k.pth", _mmpretrain_v1c_file, "mmpretrain ResNetV1c"),
    ("resnet50c", "v1c", "knet_s3_upernet_r50_ade20k.pth", _mmseg_knet_file, "mmcv ResNetV1c"),
]


@pytest.mark.parametrize(("name", "source", "filename", "write", "layout"), CASES, ids=[c[2] for c in CASES])
def test_each_published_layout_loads_every_tensor_and_is_named(
    name: str,
    source: str,
    filename: str,
    write: Callable[..., None],
    layout: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    request: pytest.FixtureRequest,
) -> None:
    state = request.getfixturevalue(source)
    path = tmp_path / filename
    write(state, path)
    with caplog.at_level(logging.INFO, logger="knet.backbone"):
        backbone = _load(name, path)
    assert backbone.pretrained_format == layout
    assert f"recognised as {layout} weights" in caplog.text and str(path) in caplog.text
    _assert_loaded(backbone, state)


def test_a_deep_stem_file_on_a_7x7_stem_backbone_is_refused_naming_the_missing_stem(
    v1c: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    path = tmp_path / "resnet50_v1c.pth"
    _mmcv_v1c_file(v1c, path)
    stem = r"missing: conv1\.weight; 13 tensor\(s\) are not in the model: conv1\.0\.weight, conv1\.1\.weight"
    with pytest.raises(KnetInputError, match=stem):
        _load("resnet50", path)


def test_a_renamed_key_is_refused_naming_it(r50: dict[str, torch.Tensor], tmp_path: Path) -> None:
    state = dict(r50)
    state["layer2.0.convX.weight"] = state.pop("layer2.0.conv1.weight")
    torch.save(state, tmp_path / "renamed.pth")
    with pytest.raises(
        KnetInputError, match=r"1 tensor\(s\) of the model are missing: layer2\.0\.conv1\.weight"
    ):
        _load("resnet50", tmp_path / "renamed.pth")
    del state["layer2.0.convX.weight"]
    state["layer2.0.conv1.weight"], state["extra.weight"] = r50["layer2.0.conv1.weight"], torch.zeros(1)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(KnetInputError, match=r"1 tensor\(s\) are not in the model: extra\.weight"):
        _load("resnet50", tmp_path / "extra.pth")


def test_a_wrong_shape_is_refused_naming_both_shapes(r50: dict[str, torch.Tensor], tmp_path: Path) -> None:
    state = dict(r50)
    state["layer1.0.conv2.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(state, tmp_path / "shape.pth")
    with pytest.raises(
        KnetInputError, match=r"layer1\.0\.conv2\.weight \(64, 64, 1, 1\) \(the model's is \(64, 64, 3, 3\)\)"
    ):
        _load("resnet50", tmp_path / "shape.pth")


def test_files_that_are_not_state_dicts_are_refused(tmp_path: Path) -> None:
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(KnetInputError, match="holds no state dict"):
        _load("resnet50", tmp_path / "list.pth")
    torch.save({"weights": Path("x")}, tmp_path / "pickled.pth")  # a pickled Python object
    with pytest.raises(UnsafeWeightsError, match="pickled"):
        _load("resnet50", tmp_path / "pickled.pth")


def test_a_timm_swin_file_loads_through_timms_feature_renaming(tmp_path: Path) -> None:
    """Swin's feature model renames layers.N to layers_N; the full model's file still loads."""
    torch.manual_seed(2)
    state = timm.create_model("swin_tiny_patch4_window7_224").state_dict()
    save_file(state, str(tmp_path / "swin_tiny.safetensors"))
    backbone = TimmBackbone(
        name="swin_tiny_patch4_window7_224",
        pretrained_path=str(tmp_path / "swin_tiny.safetensors"),
        frozen_stages=-1,
        norm_eval=False,
        output_stride=32,
        drop_path_rate=0.0,
    )
    assert backbone.pretrained_format == "timm/torchvision"
    loaded = backbone.body.state_dict()
    for key, value in loaded.items():
        assert torch.equal(value, state[key.replace("layers_", "layers.")]), key

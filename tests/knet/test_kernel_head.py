"""Initial kernels and the stride-8 feature path: FPN, localization FPN, ConvKernelHead (spec section 1)."""

from __future__ import annotations

import math

import torch

from knet.kernel_head import ConvKernelHead, dynamic_conv
from knet.localization_fpn import LocalizationFPN, sine_positional_encoding
from knet.neck import FPN


def _pyramid(channels: int = 32, height: int = 64, width: int = 96) -> list[torch.Tensor]:
    return [torch.randn(2, channels, height // s, width // s) for s in (4, 8, 16, 32)]


def _head(conv_kernel_size: int = 1, stuff: int = 2) -> ConvKernelHead:
    return ConvKernelHead(
        channels=32,
        num_proposals=5,
        num_thing_classes=3,
        num_stuff_classes=stuff,
        conv_kernel_size=conv_kernel_size,
        hard_mask_thr=0.5,
    )


def test_sine_encoding_matches_the_detr_formula_at_a_pixel() -> None:
    num_feats, height, width = 8, 5, 7
    pos = sine_positional_encoding(1, height, width, num_feats, torch.device("cpu"))
    assert pos.shape == (1, 2 * num_feats, height, width)
    y, x = 3, 4
    for i in range(num_feats):
        dim_t = 10000 ** (2 * (i // 2) / num_feats)
        y_val = (y + 1) / (height + 1e-6) * 2 * math.pi / dim_t
        x_val = (x + 1) / (width + 1e-6) * 2 * math.pi / dim_t
        trig = math.sin if i % 2 == 0 else math.cos
        assert math.isclose(pos[0, i, y, x].item(), trig(y_val), abs_tol=1e-5)
        assert math.isclose(pos[0, num_feats + i, y, x].item(), trig(x_val), abs_tol=1e-5)


def test_fpn_keeps_every_level_size_and_adds_the_coarser_level_top_down() -> None:
    torch.manual_seed(0)
    fpn = FPN(in_channels=[8, 16, 24, 32], out_channels=32)
    inputs = [torch.randn(1, c, 32 // s, 48 // s) for c, s in zip([8, 16, 24, 32], [1, 2, 4, 8], strict=True)]
    outputs = fpn(inputs)
    assert [tuple(o.shape) for o in outputs] == [(1, 32, 32 // s, 48 // s) for s in (1, 2, 4, 8)]
    top = fpn.output_convs[3](fpn.lateral_convs[3](inputs[3]))
    torch.testing.assert_close(outputs[3], top)
    lateral3 = fpn.lateral_convs[3](inputs[3])
    merged = fpn.lateral_convs[2](inputs[2]) + lateral3.repeat_interleave(2, -2).repeat_interleave(2, -1)
    torch.testing.assert_close(outputs[2], fpn.output_convs[2](merged))


def test_localization_fpn_fuses_all_levels_at_stride_8() -> None:
    loc, aux = LocalizationFPN(channels=32)(_pyramid())
    assert loc.shape == aux.shape == (2, 32, 8, 12)
    assert (loc >= 0).all() and (aux >= 0).all()  # both heads end in ReLU


def test_initial_kernels_add_the_summed_features_under_the_binary_masks() -> None:
    torch.manual_seed(0)
    head = _head(stuff=0)
    captured: dict[str, torch.Tensor] = {}
    head.loc_convs.register_forward_hook(lambda m, a, out: captured.update(loc=out))
    out = head(_pyramid())
    assert out.kernels.shape == (2, 5, 32) and out.mask_logits.shape == (2, 5, 8, 12)
    torch.testing.assert_close(
        out.mask_logits,
        dynamic_conv(captured["loc"], head.init_kernels.weight[None, :, :, 0, 0].expand(2, -1, -1), 1),
    )
    binary = out.mask_logits.sigmoid() > 0.5
    for b in range(2):
        for n in range(5):
            expected = head.init_kernels.weight[n, :, 0, 0] + out.features[b][:, binary[b, n]].sum(1)
            torch.testing.assert_close(out.kernels[b, n], expected, atol=1e-4, rtol=1e-4)


def test_panoptic_appends_stuff_kernels_from_conv_seg_and_stuff_masks_from_seg_logits() -> None:
    torch.manual_seed(0)
    head = _head(stuff=2)
    out = head(_pyramid())
    assert out.kernels.shape == (2, 7, 32) and out.seg_logits.shape == (2, 5, 8, 12)
    torch.testing.assert_close(out.kernels[0, 5:], head.conv_seg.weight[3:, :, 0, 0])
    torch.testing.assert_close(out.mask_logits[:, 5:], out.seg_logits[:, 3:])


def test_kernel_head_init_follows_the_reference_stds_and_prior() -> None:
    torch.manual_seed(0)
    head = ConvKernelHead(
        channels=256,
        num_proposals=100,
        num_thing_classes=80,
        num_stuff_classes=53,
        conv_kernel_size=1,
        hard_mask_thr=0.5,
    )
    assert 0.95 < head.init_kernels.weight.std().item() < 1.05  # std 1, not 0.01
    assert 0.009 < head.conv_seg.weight.std().item() < 0.011
    torch.testing.assert_close(head.conv_seg.bias, torch.full((133,), -math.log(99)))


def test_3x3_stuff_kernels_reproduce_conv_seg_at_the_centre_tap() -> None:
    torch.manual_seed(0)
    head = _head(conv_kernel_size=3)
    out = head(_pyramid())
    assert out.kernels.shape == (2, 7, 9, 32)
    stuff_logits = dynamic_conv(out.features, out.kernels[:, 5:], 3)
    expected = torch.einsum("sc,bchw->bshw", head.conv_seg.weight[3:, :, 0, 0], out.features)
    torch.testing.assert_close(stuff_logits, expected, atol=1e-5, rtol=1e-5)


def test_dynamic_conv_with_3x3_kernels_equals_per_image_conv2d() -> None:
    torch.manual_seed(0)
    features, kernels = torch.randn(2, 4, 6, 7), torch.randn(2, 3, 9, 4)
    out = dynamic_conv(features, kernels, 3)
    for b in range(2):
        weight = kernels[b].reshape(3, 3, 3, 4).permute(0, 3, 1, 2)  # (N, KK, C) -> (N, C, K, K)
        torch.testing.assert_close(
            out[b], torch.nn.functional.conv2d(features[b : b + 1], weight, padding=1)[0]
        )

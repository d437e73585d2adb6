"""KernelUpdateHead: one stage's data flow (spec section 2, steps 1-10)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from knet.update_stage import KernelUpdateHead


def _head(**overrides: object) -> KernelUpdateHead:
    args: dict[str, object] = dict(
        num_classes=5,
        channels=32,
        conv_kernel_size=1,
        feedforward_channels=64,
        num_heads=4,
        dropout=0.0,
        num_cls_fcs=1,
        num_mask_fcs=1,
        grouping="hard_sigmoid",
        hard_mask_thr=0.5,
    )
    args.update(overrides)
    return KernelUpdateHead(**args)  # type: ignore[arg-type]


def test_stage_outputs_have_the_documented_shapes_for_1x1_kernels() -> None:
    torch.manual_seed(0)
    out = _head()(torch.randn(2, 32, 9, 13), torch.randn(2, 7, 32), torch.randn(2, 7, 9, 13))
    assert out.cls_logits is not None and out.cls_logits.shape == (2, 7, 5)
    assert out.mask_logits.shape == (2, 7, 9, 13)
    assert out.kernels.shape == (2, 7, 32)


def test_3x3_kernels_use_the_b_n_taps_c_layout_and_convolve_with_padding() -> None:
    torch.manual_seed(0)
    out = _head(conv_kernel_size=3)(
        torch.randn(2, 32, 9, 13), torch.randn(2, 7, 9, 32), torch.randn(2, 7, 9, 13)
    )
    assert out.kernels.shape == (2, 7, 9, 32)
    assert out.mask_logits.shape == (2, 7, 9, 13)


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return x @ layer.weight.T if layer.bias is None else x @ layer.weight.T + layer.bias


def _self_attention(tokens: torch.Tensor, attention: torch.nn.MultiheadAttention) -> torch.Tensor:
    """Plain multi-head self-attention (no positional embedding, no mask): tokens (N, B, E) -> (N, B, E)."""
    num, batch, embed = tokens.shape
    heads, width = attention.num_heads, embed // attention.num_heads
    q, k, v = (tokens @ attention.in_proj_weight.T + attention.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(num, batch, heads, width).permute(1, 2, 0, 3) for t in (q, k, v))  # (B, h, N, w)
    weights = (q @ k.transpose(-1, -2) / math.sqrt(width)).softmax(-1)  # (B, h, N, N)
    mixed = (weights @ v).permute(2, 0, 1, 3).reshape(num, batch, embed)
    return _linear(mixed, attention.out_proj)


def test_interaction_is_post_norm_attention_then_post_norm_ffn_and_classes_come_from_the_summed_taps() -> (
    None
):
    """Spec section 2, steps 5-7 on 3x3 kernels: y = LN(x + MHA(x)) over the N kernels of each image,
    z = LN(y + FFN(y)) (the kernels passed on), cls = fc_cls(ReLU(LN(FC(sum of z over the K*K taps))))."""
    torch.manual_seed(0)
    head = _head(conv_kernel_size=3).double().eval()
    for module in head.modules():  # LayerNorms start at (1, 0) and attention biases at 0: make them visible
        if isinstance(module, torch.nn.LayerNorm):
            torch.nn.init.normal_(module.weight, 1.0, 0.5)
            torch.nn.init.normal_(module.bias, 0.0, 0.5)
    torch.nn.init.normal_(head.attention.in_proj_bias, 0.0, 0.5)
    torch.nn.init.normal_(head.attention.out_proj.bias, 0.0, 0.5)
    batch, num, taps, channels = 2, 5, 9, 32
    captured: dict[str, torch.Tensor] = {}
    hook = head.kernel_update_conv.register_forward_hook(lambda m, args, out: captured.update(updated=out))
    out = head(
        torch.randn(batch, channels, 6, 7, dtype=torch.float64),
        torch.randn(batch, num, taps, channels, dtype=torch.float64),
        torch.randn(batch, num, 6, 7, dtype=torch.float64),
    )
    hook.remove()

    tokens = captured["updated"].reshape(batch, num, taps * channels).transpose(0, 1)  # (N, B, K*K*C)
    attended = _layer_norm(tokens + _self_attention(tokens, head.attention), head.attention_norm)
    y = attended.transpose(0, 1).reshape(batch, num, taps, channels)
    hidden, projection = head.ffn[0], head.ffn[3]
    z = _layer_norm(y + _linear(F.relu(_linear(y, hidden)), projection), head.ffn_norm)
    torch.testing.assert_close(out.kernels, z)

    fc, norm = head.cls_fcs[0], head.cls_fcs[1]
    cls_logits = _linear(F.relu(_layer_norm(_linear(z.sum(dim=2), fc), norm)), head.fc_cls)
    assert out.cls_logits is not None
    torch.testing.assert_close(out.cls_logits, cls_logits)


def test_masks_are_the_fc_mask_kernels_convolved_with_the_transformed_features() -> None:
    torch.manual_seed(0)
    head = _head()
    features = torch.randn(1, 32, 6, 5)
    out = head(features, torch.randn(1, 3, 32), torch.randn(1, 3, 6, 5))
    transformed = head.feat_transform(features)[0]  # (C, h, w)
    mask_kernels = head.fc_mask(head.mask_fcs(out.kernels))[
        0
    ]  # passed-on kernels -> this stage's mask kernels
    for n in range(3):
        for y in range(6):
            for x in range(5):
                expected = (mask_kernels[n] * transformed[:, y, x]).sum()
                torch.testing.assert_close(out.mask_logits[0, n, y, x], expected, atol=1e-4, rtol=1e-4)


def test_hard_grouping_sums_features_under_binary_masks_without_mask_gradient() -> None:
    torch.manual_seed(0)
    head = _head()
    features = torch.randn(1, 32, 4, 4)
    mask_logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    captured: dict[str, torch.Tensor] = {}
    hook = head.kernel_update_conv.register_forward_hook(lambda m, args, out: captured.update(group=args[0]))
    out = head(features, torch.randn(1, 3, 32), mask_logits)
    hook.remove()
    transformed = head.feat_transform(features)[0]
    binary = mask_logits.detach()[0].sigmoid() > 0.5
    for n in range(3):
        expected = transformed[:, binary[n]].sum(dim=1)  # a plain sum over the claimed pixels
        torch.testing.assert_close(captured["group"][n], expected, atol=1e-5, rtol=1e-5)
    out.mask_logits.sum().backward()
    assert mask_logits.grad is None


def test_softmax_grouping_has_mask_gradient_and_no_class_branch() -> None:
    torch.manual_seed(0)
    head = _head(num_classes=None, grouping="softmax")
    mask_logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    out = head(torch.randn(1, 32, 4, 4), torch.randn(1, 3, 32), mask_logits)
    assert out.cls_logits is None and head.fc_cls is None
    out.mask_logits.sum().backward()
    assert mask_logits.grad is not None and mask_logits.grad.abs().sum() > 0


def test_narrow_updator_runs_wide_kernels_in_chunks_with_shared_weights() -> None:
    torch.manual_seed(0)
    head = _head(num_classes=None, grouping="softmax", channels=64, updator_channels=32)
    assert head.kernel_update_conv.channels == 32
    out = head(torch.randn(2, 64, 5, 5), torch.randn(2, 4, 64), torch.randn(2, 4, 5, 5))
    assert out.kernels.shape == (2, 4, 64)


def test_masks_at_another_resolution_are_resized_to_the_features() -> None:
    out = _head()(torch.randn(1, 32, 8, 8), torch.randn(1, 3, 32), torch.randn(1, 3, 16, 16))
    assert out.mask_logits.shape == (1, 3, 8, 8)


def test_class_bias_starts_at_the_focal_prior() -> None:
    head = _head()
    assert head.fc_cls is not None
    torch.testing.assert_close(head.fc_cls.bias, torch.full((5,), -4.59512), atol=1e-4, rtol=0)


@pytest.mark.parametrize("grouping", ["hard_sigmoid", "softmax"])
def test_matrices_are_xavier_uniform_and_the_feature_transform_bias_starts_at_zero(grouping: str) -> None:
    """mmcv's ConvModule zeroes the feat_transform bias; K-Net then re-draws only the matrices
    (xavier-uniform, bound sqrt(6 / (fan_in + fan_out))), so the bias stays 0.

    The semantic (softmax) stages get the same init here. In mmseg the stages sit in a plain
    nn.ModuleList, which mm's init_weights recursion does not enter, so there they probably keep the
    PyTorch / ConvModule init (spec "upstream quirks" 4): a choice not yet replicated."""
    head = _head(channels=256, feedforward_channels=2048, num_heads=8, grouping=grouping)
    assert torch.equal(head.feat_transform.bias, torch.zeros(256))
    weight = head.feat_transform.weight.detach()  # (256, 256, 1, 1): fan_in = fan_out = 256
    bound = math.sqrt(6 / (256 + 256))
    assert float(weight.abs().max()) <= bound
    assert abs(float(weight.std()) / (bound / math.sqrt(3)) - 1) < 0.02  # uniform: std = bound / sqrt(3)
    ffn_in = head.ffn[0].weight.detach()  # (2048, 256)
    assert float(ffn_in.abs().max()) <= math.sqrt(6 / (256 + 2048))


def test_unknown_grouping_is_rejected() -> None:
    with pytest.raises(ValueError, match="grouping"):
        _head(grouping="mean")

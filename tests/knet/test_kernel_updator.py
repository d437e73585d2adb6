"""KernelUpdator against the spec's formulas (section 2), recomputed by hand from the module's weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from knet.kernel_updator import KernelUpdator


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = x.var(-1, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def _reference(module: KernelUpdator, group: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    c = module.channels
    params = _linear(group, module.dynamic_layer)  # (M, 2C)
    p_in, p_out = params[:, None, :c], params[:, None, c:]
    inputs = _linear(kernels, module.input_layer)
    i_in, i_out = inputs[..., :c], inputs[..., c:]
    g = i_in * p_in  # F^G
    gate_in = torch.sigmoid(
        _layer_norm(_linear(g, module.input_gate), module.input_norm_in)
    )  # crossed pairing
    gate_upd = torch.sigmoid(_layer_norm(_linear(g, module.update_gate), module.norm_in))
    mixed = gate_upd * _layer_norm(p_out, module.norm_out) + gate_in * _layer_norm(
        i_out, module.input_norm_out
    )
    return F.relu(_layer_norm(_linear(mixed, module.fc_layer), module.fc_norm))


def _randomise_norms(module: KernelUpdator) -> None:
    """LayerNorms start at (1, 0); random affine values make a wrong LN pairing visible."""
    for norm in module.modules():
        if isinstance(norm, torch.nn.LayerNorm):
            torch.nn.init.normal_(norm.weight, 1.0, 0.5)
            torch.nn.init.normal_(norm.bias, 0.0, 0.5)


def test_updator_equals_the_gating_formulas_without_a_residual_for_1x1_kernels() -> None:
    torch.manual_seed(0)
    module = KernelUpdator(channels=32)
    _randomise_norms(module)
    group, kernels = torch.randn(6, 32) * 3, torch.randn(6, 1, 32)
    torch.testing.assert_close(module(group, kernels), _reference(module, group, kernels))


def test_updator_broadcasts_the_group_feature_over_kernel_taps() -> None:
    torch.manual_seed(1)
    module = KernelUpdator(channels=32)
    _randomise_norms(module)
    group, kernels = torch.randn(4, 32), torch.randn(4, 9, 32)
    out = module(group, kernels)
    assert out.shape == (4, 9, 32)
    torch.testing.assert_close(out, _reference(module, group, kernels))


def test_updator_output_is_non_negative() -> None:
    torch.manual_seed(2)
    module = KernelUpdator(channels=32)
    group, kernels = torch.randn(5, 32), torch.randn(5, 1, 32)
    out = module(group, kernels)
    assert (out >= 0).all()


def test_updator_parameter_count_matches_the_spec_fingerprint() -> None:
    assert sum(p.numel() for p in KernelUpdator(channels=256).parameters()) == 463_104

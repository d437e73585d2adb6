"""The paper's adaptive kernel update: a gated mix of group features and kernels (spec section 2).

Paper notation: F^G = phi1(F^K) * phi2(K); G^F = sigma(psi1(F^G)); G^K = sigma(psi2(F^G));
K~ = G^F * psi3(F^K) + G^K * psi4(K), then FC + LN + ReLU. There is no residual around it.
"""

from __future__ import annotations

from torch import Tensor, nn


class KernelUpdator(nn.Module):
    """forward(group_features (M, C), kernels (M, KK, C)) -> new kernels (M, KK, C), M = B * N.

    The group feature broadcasts over the KK taps. The gate/LayerNorm pairing is crossed as upstream:
    ``update_gate`` is normalised by ``norm_in`` and ``input_gate`` by ``input_norm_in``.
    """

    def __init__(
        self,
        *,
        channels: int,
        gate_sigmoid: bool = True,
        gate_norm_act: bool = False,
        activate_out: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.gate_sigmoid = gate_sigmoid
        self.gate_norm_act = gate_norm_act
        self.activate_out = activate_out
        self.dynamic_layer = nn.Linear(channels, 2 * channels)  # [phi1 | psi3] applied to F^K
        self.input_layer = nn.Linear(channels, 2 * channels)  # [phi2 | psi4] applied to K
        self.input_gate = nn.Linear(channels, channels)
        self.update_gate = nn.Linear(channels, channels)
        self.gate_norm = nn.LayerNorm(channels) if gate_norm_act else None
        self.norm_in = nn.LayerNorm(channels)
        self.norm_out = nn.LayerNorm(channels)
        self.input_norm_in = nn.LayerNorm(channels)
        self.input_norm_out = nn.LayerNorm(channels)
        self.activation = nn.ReLU(inplace=False)
        self.fc_layer = nn.Linear(channels, channels)
        self.fc_norm = nn.LayerNorm(channels)

    def forward(self, group_features: Tensor, kernels: Tensor) -> Tensor:
        parameters = self.dynamic_layer(group_features)  # (M, 2C)
        param_in, param_out = parameters[:, None, : self.channels], parameters[:, None, self.channels :]
        inputs = self.input_layer(kernels)  # (M, KK, 2C)
        input_in, input_out = inputs[..., : self.channels], inputs[..., self.channels :]
        gate_features = input_in * param_in  # (M, KK, C)
        if self.gate_norm is not None:
            gate_features = self.activation(self.gate_norm(gate_features))
        input_gate = self.input_norm_in(self.input_gate(gate_features))
        update_gate = self.norm_in(self.update_gate(gate_features))
        if self.gate_sigmoid:
            input_gate, update_gate = input_gate.sigmoid(), update_gate.sigmoid()
        param_out = self.norm_out(param_out)
        input_out = self.input_norm_out(input_out)
        if self.activate_out:
            param_out, input_out = self.activation(param_out), self.activation(input_out)
        updated = update_gate * param_out + input_gate * input_out  # (M, KK, C)
        return self.activation(self.fc_norm(self.fc_layer(updated)))

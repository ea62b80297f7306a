"""A dense FFN of the same kinds: shared experts (DeepSeekMoE, Qwen2-MoE), dense layers,
and the dense baseline with the same active FLOPs."""

from __future__ import annotations

import torch
from torch import nn

from moekit.layers import linear
from moekit.moe.experts.activations import ACTIVATIONS


class DenseFFN(nn.Module):
    """y = act(x W_inᵀ) W_outᵀ with W_in (N, D) = [gate | up] for gated kinds."""

    def __init__(self, d_model: int, d_ff: int, kind: str = "swiglu", init_std: float = 0.02) -> None:
        super().__init__()
        self.act = ACTIVATIONS.get(kind)
        self.w_in = nn.Parameter(torch.randn(self.act.width_in(d_ff), d_model) * init_std)
        self.w_out = nn.Parameter(torch.randn(d_model, d_ff) * init_std)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        h = linear(x_TD, self.w_in)
        return linear(self.act.fwd(h), self.w_out)


class SharedExperts(nn.Module):
    """num_shared experts of width d_ff seen by every token, fused into one FFN of width
    num_shared·d_ff (equal by linearity of the sum; DeepSeekMoE §3.2), with an optional
    per-token sigmoid gate (Qwen2-MoE's shared_expert_gate)."""

    def __init__(self, d_model: int, d_ff: int, num_shared: int, kind: str, gate: bool,
                 init_std: float = 0.02) -> None:
        super().__init__()
        self.ffn = DenseFFN(d_model, d_ff * num_shared, kind, init_std)
        self.gate = nn.Linear(d_model, 1, bias=False) if gate else None
        if self.gate is not None:
            nn.init.normal_(self.gate.weight, std=init_std)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        y_TD = self.ffn(x_TD)
        if self.gate is not None:
            y_TD = y_TD * torch.sigmoid(self.gate(x_TD))
        return y_TD

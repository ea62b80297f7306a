"""PR-MoE's residual MoE (DeepSpeed-MoE, Rajbhandari et al. 2022 §4.1): a dense FFN on
every token, with the routed experts as a correction. As in DeepSpeed's `use_residual`
(deepspeed/moe/layer.py), a per-token linear layer gives two logits, and
    y = c₀ · moe(x) + c₁ · mlp(x),   (c₀, c₁) = softmax(x W_cᵀ + b)  (DeepSpeed's order).
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.moe.experts.dense import DenseFFN


class ResidualMix(nn.Module):
    def __init__(self, d_model: int, d_ff: int, kind: str, init_std: float = 0.02) -> None:
        super().__init__()
        self.mlp = DenseFFN(d_model, d_ff, kind, init_std)
        self.coef = nn.Linear(d_model, 2)  # DeepSpeed: a Linear(D, 2) with bias

    def forward(self, x_TD: torch.Tensor, moe_TD: torch.Tensor) -> torch.Tensor:
        c_T2 = torch.softmax(self.coef(x_TD).float(), dim=-1).to(x_TD.dtype)
        return moe_TD * c_T2[:, :1] + self.mlp(x_TD) * c_T2[:, 1:]

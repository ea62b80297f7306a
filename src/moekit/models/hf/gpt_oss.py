"""GPT-OSS experts (OpenAI 2025, gpt-oss model card §2.1): biased, clamped SwiGLU.

    h = x W_inᵀ + b_in,  [g | u] = h                     (the checkpoint interleaves g and u;
                                                         the loader de-interleaves them)
    g = min(g, limit),  u = clamp(u, -limit, limit)
    a = (u + 1) · g · σ(α g)                             α = 1.702
    y = a W_outᵀ + b_out
Same contract as ExpertBank: forward(x_TD, plan) runs every expert on its rows and
combines them with the routing weights. A loop over experts (the biases keep it off
the fused bias-free path); it is both the implementation and its own oracle.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.moe.types import DispatchPlan
from moekit.ops.sort import permute, unpermute


class ClampedSwiGLUExperts(nn.Module):
    def __init__(self, num_experts: int, d_model: int, d_ff: int, limit: float = 7.0,
                 alpha: float = 1.702, init_std: float = 0.02) -> None:
        super().__init__()
        self.limit, self.alpha = limit, alpha
        self.w_in = nn.Parameter(torch.randn(num_experts, 2 * d_ff, d_model) * init_std)
        self.b_in = nn.Parameter(torch.zeros(num_experts, 2 * d_ff))
        self.w_out = nn.Parameter(torch.randn(num_experts, d_model, d_ff) * init_std)
        self.b_out = nn.Parameter(torch.zeros(num_experts, d_model))

    def act(self, h_nN: torch.Tensor) -> torch.Tensor:
        g, u = h_nN.chunk(2, dim=-1)
        g, u = g.clamp(max=self.limit), u.clamp(-self.limit, self.limit)
        return (u + 1) * g * torch.sigmoid(g * self.alpha)

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan, backend: str | None = None) -> torch.Tensor:
        rows_RD = permute(x_TD, plan.token_idx_R)
        outs, start = [], 0
        for e, count in enumerate(plan.counts_E.tolist()):
            r_nD = rows_RD[start : start + count]
            h_nN = torch.addmm(self.b_in[e], r_nD, self.w_in[e].t())
            outs.append(torch.addmm(self.b_out[e], self.act(h_nN), self.w_out[e].t()))
            start += count
        out_RD = torch.cat(outs) if outs else rows_RD
        return unpermute(out_RD, plan.token_idx_R, plan.num_tokens, plan.weights_R)


def deinterleave(t: torch.Tensor) -> torch.Tensor:
    """(..., 2F) with g, u alternating -> (..., 2F) = [g | u]."""
    return torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)


def interleave(t: torch.Tensor) -> torch.Tensor:
    """The inverse of deinterleave."""
    g, u = t.chunk(2, dim=-1)
    return torch.stack([g, u], dim=-1).flatten(-2)

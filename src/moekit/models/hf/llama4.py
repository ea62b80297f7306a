"""Llama 4 experts: the routing score scales the token *before* the expert.

Llama 4 (transformers Llama4TextMoe) computes expert(s·x) with s = σ(router logit),
not s·expert(x); with a SwiGLU expert the two differ. Same contract as ExpertBank
(forward(x_TD, plan) -> y_TD, combine included); HF's fused gate_up_proj (E, D, 2F)
is stored here as moekit's w_in (E, 2F, D) = [gate | up].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.moe.types import DispatchPlan
from moekit.ops.sort import permute, unpermute


class PrescaledSwiGLUExperts(nn.Module):
    def __init__(self, num_experts: int, d_model: int, d_ff: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(num_experts, 2 * d_ff, d_model) * init_std)
        self.w_out = nn.Parameter(torch.randn(num_experts, d_model, d_ff) * init_std)

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan, backend: str | None = None) -> torch.Tensor:
        rows_RD = permute(x_TD, plan.token_idx_R) * plan.weights_R.to(x_TD.dtype)[:, None]
        outs, start = [], 0
        for e, count in enumerate(plan.counts_E.tolist()):
            g_nF, u_nF = (rows_RD[start : start + count] @ self.w_in[e].t()).chunk(2, dim=-1)
            outs.append((F.silu(g_nF) * u_nF) @ self.w_out[e].t())
            start += count
        out_RD = torch.cat(outs) if outs else rows_RD
        return unpermute(out_RD, plan.token_idx_R, plan.num_tokens)

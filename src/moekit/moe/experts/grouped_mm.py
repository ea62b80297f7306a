"""Experts on torch's grouped GEMM: device-agnostic, one grouped matmul per projection.

    x_RD = x_TD[token_idx_R]                          gather (rows sorted by expert)
    h_RN = grouped_mm(x_RD, W_inᵀ, offs)              offs = cumsum(counts_E): no host sync
    a_RF = act(h_RN) · w_R                            the routing weight on the narrow side
    o_RD = grouped_mm(a_RF, W_outᵀ, offs)
    y_TD = zeros.index_add(token_idx_R, o_RD)         combine

A gated FFN keeps gate and up stacked in W_in (N = 2F), so it is two grouped matmuls,
not three. Nothing here reads a tensor's values on the host (no .tolist(), .item() or
.cpu()), so on CUDA the whole forward and backward queue without a sync; autograd
differentiates it (torch has grouped_mm's backward). grouped_mm takes float32,
bfloat16 and float16 (no float64: the loop oracle and the CPU wing keep fp64 exact) and
rows of whole 16 bytes (d_model and d_ff multiples of 4 in fp32, of 8 in bf16): the
bank checks both when it resolves its implementation (bank.py: resolve_impl).
On the CPU it is a loop of mm inside torch (moekit's CPU wing is faster there); it is
the default on CUDA and for dtypes the CPU wing does not take.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit.moe.experts.activations import Activation
from moekit.moe.types import DispatchPlan

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_experts(x_TD: torch.Tensor, plan: DispatchPlan, w_in_END: torch.Tensor,
                       w_out_EDF: torch.Tensor, act: Activation) -> torch.Tensor:
    offs_E = plan.counts_E.cumsum(0).to(torch.int32)
    x_RD = x_TD.index_select(0, plan.token_idx_R)
    h_RN = F.grouped_mm(x_RD, w_in_END.transpose(-2, -1), offs=offs_E)
    w_R1 = plan.weights_R.to(x_TD.dtype).unsqueeze(1)
    Fh, D = w_out_EDF.shape[2], w_out_EDF.shape[1]
    a_RF = act.fwd(h_RN)
    if Fh <= D:  # out = (w·a) W_outᵀ: the weight scales the narrower side
        a_RF = a_RF * w_R1
    out_RD = F.grouped_mm(a_RF, w_out_EDF.transpose(-2, -1), offs=offs_E)
    if Fh > D:
        out_RD = out_RD * w_R1
    return x_TD.new_zeros(x_TD.shape).index_add(0, plan.token_idx_R, out_RD)

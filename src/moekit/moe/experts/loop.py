"""The reference oracle: a Python loop over experts, differentiated by autograd.
Slow and obviously correct; every other implementation is tested against it."""

from __future__ import annotations

import torch

from moekit.moe.experts.activations import Activation
from moekit.moe.types import DispatchPlan
from moekit.ops.sort import permute, unpermute


def loop_experts(x_TD: torch.Tensor, plan: DispatchPlan, w_in_END: torch.Tensor,
                 w_out_EDF: torch.Tensor, act: Activation) -> torch.Tensor:
    rows_RD = permute(x_TD, plan.token_idx_R)
    outs, start = [], 0
    for e, count in enumerate(plan.counts_E.tolist()):
        r_nD = rows_RD[start : start + count]
        outs.append(act.fwd(r_nD @ w_in_END[e].t()) @ w_out_EDF[e].t())
        start += count
    out_RD = torch.cat(outs) if outs else rows_RD
    return unpermute(out_RD, plan.token_idx_R, plan.num_tokens, plan.weights_R)

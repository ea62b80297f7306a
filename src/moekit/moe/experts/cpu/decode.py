"""The CPU wing's decode path: a few rows per expert, no gradient.

At decode time (1-8 tokens) each expert gets 0-2 rows, so its GEMMs are mat-vecs that
cost one read of the expert's weights; the chunked path's fixed costs (chunk planning,
buffers, a GEMM call per expert and projection) then weigh more than the arithmetic.
Here both projections of all experts are one call each of the grouped row mat-vec
(ops/rowmv.py), which reads only the experts that have rows. cpu/path.py takes this
path when every expert has at most DECODE_MAX_ROWS rows and autograd needs nothing; the
result equals the chunk loop's (tests/test_decode.py).

A whole decode step of a layer in one kernel call (router, dispatch, experts, combine
and shared experts) is an inference-time swap made from outside the layer:
moekit/inference/fused_decode.py.
"""

from __future__ import annotations

import torch

from moekit.moe.experts.activations import Activation
from moekit.moe.types import DispatchPlan
from moekit.ops import rowmv


def decode_experts(x_TD: torch.Tensor, plan: DispatchPlan, counts: list[int], w_in_END: torch.Tensor,
                   w_out_EDF: torch.Tensor, act: Activation) -> torch.Tensor:
    offsets_E1 = torch.tensor([0, *counts], dtype=torch.int64).cumsum_(0)
    x_RD = x_TD.index_select(0, plan.token_idx_R)
    h_RN = rowmv.grouped_rows_linear(x_RD, w_in_END, offsets_E1)
    out_RD = rowmv.grouped_rows_linear(act.fwd(h_RN), w_out_EDF, offsets_E1)
    out_RD.mul_(plan.weights_R.to(out_RD.dtype).unsqueeze(1))
    return x_TD.new_zeros(x_TD.shape).index_add_(0, plan.token_idx_R, out_RD)

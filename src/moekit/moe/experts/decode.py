"""The decode path of the grouped backend: a few rows per expert, no gradient.

At decode time (1-8 tokens) each expert gets 0-2 rows, so its GEMMs are mat-vecs that
cost one read of the expert's weights; the chunked GEMM path's fixed costs (chunk
planning, buffers, a GEMM call per expert and projection) then weigh more than the
arithmetic. Here both projections of all experts are one call each of the grouped
row mat-vec (ops/rowmv.py), which reads only the experts that have rows.
grouped_experts hands a call over when every expert has at most DECODE_MAX_ROWS rows
and autograd needs nothing; the result equals the chunked path's (tests/test_decode.py).

A whole SwiGLU layer step (routed experts, combine and the shared expert) goes further,
into one kernel call: ops/csrc/decode_ffn.cpp, through `fused_step`, which MoELayer tries
when its whole-layer step (moe/decode_step.py, which adds the router and dispatch) does
not apply, e.g. for other routers; it returns None where the kernel does not apply.
`fused_reference` is the unfused composition it must equal.
"""

from __future__ import annotations

import torch

from moekit.moe.experts.activations import Activation
from moekit.moe.types import DispatchPlan
from moekit.ops import ext, rowmv

# rows per expert up to which the mat-vec kernel beats per-expert GEMMs: in a probe
# over 1, 2, 4, 8, 16 rows of weights read from memory, it matched or beat oneDNN up to
# 4 rows and fell behind from 8 (oneDNN's register blocking reuses each weight load)
DECODE_MAX_ROWS = 4
# tokens up to which fused_step takes a step: every weight row is then read once for up
# to 8 rows (an expert has at most one row per token), 16 vector accumulators
FUSED_MAX_TOKENS = 8


def takes(x_TD: torch.Tensor, counts: list[int], w_in_END: torch.Tensor, w_out_EDF: torch.Tensor,
          weights_R: torch.Tensor) -> bool:
    if max(counts, default=0) > DECODE_MAX_ROWS:
        return False
    if torch.is_grad_enabled() and (w_out_EDF.requires_grad or weights_R.requires_grad):
        return False
    return rowmv.applies(x_TD, w_in_END) and rowmv.applies(x_TD, w_out_EDF)  # both check grads too


def decode_experts(x_TD: torch.Tensor, plan: DispatchPlan, counts: list[int], w_in_END: torch.Tensor,
                   w_out_EDF: torch.Tensor, act: Activation) -> torch.Tensor:
    offsets_E1 = torch.tensor([0, *counts], dtype=torch.int64).cumsum_(0)
    x_RD = x_TD.index_select(0, plan.token_idx_R)
    h_RN = rowmv.grouped_rows_linear(x_RD, w_in_END, offsets_E1)
    out_RD = rowmv.grouped_rows_linear(act.fwd(h_RN), w_out_EDF, offsets_E1)
    out_RD.mul_(plan.weights_R.to(out_RD.dtype).unsqueeze(1))
    return x_TD.new_zeros(x_TD.shape).index_add_(0, plan.token_idx_R, out_RD)


def standard_modules(experts, shared) -> bool:
    """moekit's own expert bank and shared FFN (an HF family may swap in its own kinds,
    e.g. GPT-OSS's clamped SwiGLU with biases, which the kernels do not compute)."""
    from moekit.moe.experts.bank import ExpertBank
    from moekit.moe.experts.dense import SharedExperts

    return type(experts) is ExpertBank and (shared is None or type(shared) is SharedExperts)


def no_grad_needed(*tensors: torch.Tensor) -> bool:
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


def kernel_weights(x_TD: torch.Tensor, experts, shared) -> list | None:
    """[w_in, w_out, s_in, s_out, s_gate] (the shared ones None without a shared FFN) when
    the decode kernels (ops/csrc/decode_ffn.cpp) can take this input and these modules:
    1..FUSED_MAX_TOKENS tokens, CPU float32, moekit's grouped SwiGLU bank and shared FFN."""
    if not 0 < x_TD.shape[0] <= FUSED_MAX_TOKENS or x_TD.device.type != "cpu" or x_TD.dtype != torch.float32:
        return None
    if not standard_modules(experts, shared) or experts.backend_name != "grouped" or experts.act.name != "swiglu":
        return None
    weights = [experts.w_in, experts.w_out, None, None, None]
    if shared is not None:
        if shared.ffn.act.name != "swiglu":
            return None
        weights[2:] = shared.ffn.w_in, shared.ffn.w_out, None if shared.gate is None else shared.gate.weight.reshape(-1)
    if any(w is not None and w.dtype != torch.float32 for w in weights):
        return None
    return weights


def fused_step(x_TD: torch.Tensor, plan: DispatchPlan, experts, shared) -> torch.Tensor | None:
    """Routed SwiGLU experts + combine + shared experts (moe/experts/dense.py, gate
    included) in one kernel call for a decode step on CPU float32; None where it does not
    apply (see kernel_weights; also a gradient needed, or no build)."""
    weights = kernel_weights(x_TD, experts, shared)
    if weights is None or plan.weights_R.dtype != torch.float32:
        return None
    if not no_grad_needed(x_TD, plan.weights_R, *(w for w in weights if w is not None)) or not ext.available():
        return None
    return ext.op("moe_decode_swiglu")(x_TD.contiguous(), plan.token_idx_R.contiguous(), plan.weights_R.contiguous(),
                                        plan.counts_E.to(torch.int64).contiguous(), *weights)


def fused_reference(x_TD: torch.Tensor, plan: DispatchPlan, experts, shared) -> torch.Tensor:
    """What fused_step computes, with the unfused modules."""
    y_TD = experts(x_TD, plan)
    return y_TD if shared is None else y_TD + shared(x_TD)

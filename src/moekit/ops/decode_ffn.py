"""Typed faces of the decode-step kernels (csrc/decode_ffn.cpp), with their references.

    experts_step(x_TD, rows, ffn) -> y_TD
        routed SwiGLU experts + weighted combine + the shared SwiGLU expert (with its
        optional sigmoid gate), for a few tokens, in two parallel passes over the weights.
    layer_step(x_TD, router, ffn) -> DecodeStep
        the same with the router (softmax or DeepSeek-V3's sigmoid top-k) and dropless
        dispatch in front: everything MoELayer's stages would return.

The kernels serve CPU float32 inference (no backward). `experts_step_reference` is the
same maths in torch; layer_step's reference is MoELayer's staged forward
(tests/test_decode.py compares every field). inference/fused_decode.py is the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moekit.ops import ext


@dataclass(frozen=True)
class DecodeFFN:
    """The weights a decode step reads: routed experts, and the shared FFN if any."""

    w_in_END: torch.Tensor  # (E, 2F, D): gate rows, then up rows
    w_out_EDF: torch.Tensor  # (E, D, F)
    shared_in: torch.Tensor | None = None  # (2Fs, D)
    shared_out: torch.Tensor | None = None  # (D, Fs)
    shared_gate_D: torch.Tensor | None = None  # (D,): Qwen2-MoE's sigmoid gate on the shared output


@dataclass(frozen=True)
class DecodeRouter:
    """A top-k router in the kernel's terms (moe/router/topk_softmax.py, topk_sigmoid.py)."""

    weight_ED: torch.Tensor
    bias_E: torch.Tensor | None
    selection_bias_E: torch.Tensor | None  # DeepSeek-V3's bias: chooses experts, not weights
    top_k: int
    sigmoid: bool  # DeepSeek-V3 scores; else softmax
    softmax_after: bool  # GPT-OSS: softmax over the chosen k logits
    normalize: bool
    scaling: float
    n_group: int = 1
    topk_group: int = 1


@dataclass(frozen=True)
class DecodeRows:
    """Routed rows sorted by expert: token and routing weight per row, rows per expert."""

    token_idx_R: torch.Tensor
    weights_R: torch.Tensor
    counts_E: torch.Tensor


@dataclass(frozen=True)
class DecodeStep:
    y_TD: torch.Tensor
    logits_TE: torch.Tensor
    probs_TE: torch.Tensor
    expert_ids_TK: torch.Tensor
    weights_TK: torch.Tensor
    token_idx_R: torch.Tensor
    slot_idx_R: torch.Tensor
    weights_R: torch.Tensor
    counts_E: torch.Tensor


def _shared(ffn: DecodeFFN) -> tuple:
    return ffn.shared_in, ffn.shared_out, ffn.shared_gate_D


def experts_step(x_TD: torch.Tensor, rows: DecodeRows, ffn: DecodeFFN) -> torch.Tensor:
    return ext.op("moe_decode_swiglu")(x_TD.contiguous(), rows.token_idx_R.contiguous(),
                                       rows.weights_R.contiguous(), rows.counts_E.to(torch.int64).contiguous(),
                                       ffn.w_in_END, ffn.w_out_EDF, *_shared(ffn))


def layer_step(x_TD: torch.Tensor, router: DecodeRouter, ffn: DecodeFFN) -> DecodeStep:
    r = router
    out = ext.op("moe_decode_topk")(x_TD.contiguous(), r.weight_ED, r.bias_E, r.selection_bias_E, r.top_k,
                                    r.sigmoid, r.softmax_after, r.normalize, r.scaling, r.n_group, r.topk_group,
                                    ffn.w_in_END, ffn.w_out_EDF, *_shared(ffn))
    return DecodeStep(*out)


def experts_step_reference(x_TD: torch.Tensor, rows: DecodeRows, ffn: DecodeFFN) -> torch.Tensor:
    """The same maths as plain torch ops, one expert at a time."""
    y_TD = torch.zeros_like(x_TD)
    start = 0
    for e, n in enumerate(rows.counts_E.tolist()):
        tok = rows.token_idx_R[start:start + n]
        g, u = (x_TD[tok] @ ffn.w_in_END[e].t()).chunk(2, dim=-1)
        y_TD.index_add_(0, tok, (F.silu(g) * u) @ ffn.w_out_EDF[e].t() * rows.weights_R[start:start + n, None])
        start += n
    if ffn.shared_in is not None:
        g, u = (x_TD @ ffn.shared_in.t()).chunk(2, dim=-1)
        s_TD = (F.silu(g) * u) @ ffn.shared_out.t()
        if ffn.shared_gate_D is not None:
            s_TD = s_TD * torch.sigmoid(x_TD @ ffn.shared_gate_D)[:, None]
        y_TD = y_TD + s_TD
    return y_TD

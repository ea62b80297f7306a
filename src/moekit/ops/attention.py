"""Causal attention with the rotary embedding inside, for short sequences on CPU float32:
csrc/attention.cpp, with the torch reference beside it.

    attend(q_BHSd, k_BGLd, v_BGLd, cos_SD, sin_SD, causal) = SDPA(rot(q), rot(k), v)

q, k, v come before the rotation (the projections' outputs as (B, heads, S, d) views);
cos_SD, sin_SD are the rotary tables for the S positions (models/rope.py), or None for
no rotation. The kernel writes the
output in (B, S, H, d) memory, so the output projection reads it without a copy.

Why a kernel: see csrc/attention.cpp. In a training step of the `tiny` preset (d 128,
4 heads of 32, 128 positions) torch's path spends about 6 ms of a 14 ms attention block
in SDPA's flash kernel and about 2 ms more in RoPE passes and per-head copies
(benchmarks/train.py --breakdown). The kernel holds each query row's whole key range at
once, so it serves sequences up to MAX_LEN; longer ones, other dtypes and devices,
dropout, and builds without the extension take the reference.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from moekit.ops import ext
from moekit.ops.rope import rotate

# longest sequence the kernel takes: each thread keeps k, v and their transposes for
# MAX_LEN positions (4 x MAX_LEN x d floats) and each query row's MAX_LEN scores
MAX_LEN = 512
LANES = 16  # the kernel's head dim must be a multiple of this
ENABLED = os.environ.get("MOEKIT_ATTENTION_KERNEL", "1") != "0"


def applies(q_BHSd: torch.Tensor, k_BGLd: torch.Tensor, dropout_p: float) -> bool:
    """CPU float32, a full causal square (no cached keys), a head dim the kernel tiles,
    at most MAX_LEN positions, no dropout, and the kernels built."""
    S, d = q_BHSd.shape[2], q_BHSd.shape[3]
    return (ENABLED and dropout_p == 0.0 and q_BHSd.device.type == "cpu" and q_BHSd.dtype == torch.float32
            and k_BGLd.dtype == torch.float32 and k_BGLd.shape[2] == S and 0 < S <= MAX_LEN and d % LANES == 0
            and q_BHSd.shape[1] % k_BGLd.shape[1] == 0 and ext.available())


def attend(q_BHSd: torch.Tensor, k_BGLd: torch.Tensor, v_BGLd: torch.Tensor, cos_SD: torch.Tensor | None,
           sin_SD: torch.Tensor | None, causal: bool = True) -> torch.Tensor:
    """The kernel where `applies`, else the reference."""
    if applies(q_BHSd, k_BGLd, 0.0):
        return kernel(q_BHSd, k_BGLd, v_BGLd, cos_SD, sin_SD, causal)
    return reference(q_BHSd, k_BGLd, v_BGLd, cos_SD, sin_SD, causal)


def kernel(q_BHSd, k_BGLd, v_BGLd, cos_SD, sin_SD, causal: bool = True) -> torch.Tensor:
    """The kernel alone, for callers that already checked `applies`."""
    if cos_SD is None:
        cos_SD = sin_SD = q_BHSd.new_empty(0)
    return _Attention.apply(q_BHSd, k_BGLd, v_BGLd, cos_SD.float().contiguous(), sin_SD.float().contiguous(),
                            causal)


def reference(q_BHSd, k_BGLd, v_BGLd, cos_SD, sin_SD, causal: bool = True) -> torch.Tensor:
    """models/attention.py's path: rotate, then torch's SDPA (GQA by head groups)."""
    if cos_SD is not None:
        q_BHSd, k_BGLd = rotate(q_BHSd, cos_SD, sin_SD), rotate(k_BGLd, cos_SD, sin_SD)
    return F.scaled_dot_product_attention(q_BHSd, k_BGLd, v_BGLd, is_causal=causal,
                                          enable_gqa=k_BGLd.shape[1] != q_BHSd.shape[1])


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_BHSd, k_BGLd, v_BGLd, cos_SD, sin_SD, causal: bool):
        q_BHSd, k_BGLd, v_BGLd = _rows(q_BHSd), _rows(k_BGLd), _rows(v_BGLd)
        B, H, S, d = q_BHSd.shape
        o_BHSd = q_BHSd.new_empty(B, S, H, d).transpose(1, 2)  # (B, S, H, d) memory
        lse_BHS = q_BHSd.new_empty(B, H, S)
        ext.op("attention_fwd")(q_BHSd, k_BGLd, v_BGLd, cos_SD, sin_SD, cos_SD, sin_SD, o_BHSd, lse_BHS,
                                d ** -0.5, 0, causal)
        ctx.save_for_backward(q_BHSd, k_BGLd, v_BGLd, cos_SD, sin_SD, o_BHSd, lse_BHS)
        ctx.causal = causal
        return o_BHSd

    @staticmethod
    def backward(ctx, do_BHSd):
        q_BHSd, k_BGLd, v_BGLd, cos_SD, sin_SD, o_BHSd, lse_BHS = ctx.saved_tensors
        dq, dk, dv = (torch.empty_like(t) for t in (q_BHSd, k_BGLd, v_BGLd))  # strides kept
        ext.op("attention_bwd")(q_BHSd, k_BGLd, v_BGLd, cos_SD, sin_SD, cos_SD, sin_SD, o_BHSd, lse_BHS,
                                _rows(do_BHSd), dq, dk, dv, q_BHSd.shape[-1] ** -0.5, 0, ctx.causal)
        return dq, dk, dv, None, None, None

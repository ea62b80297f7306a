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

import torch
import torch.nn.functional as F

from moekit import settings
from moekit.ops import ext
from moekit.ops.rope import rotate

# longest sequence the kernel takes: each thread keeps k, v and their transposes for
# MAX_LEN positions (4 x MAX_LEN x d floats) and each query row's MAX_LEN scores
MAX_LEN = 512
LANES = 16  # the kernel's head dim must be a multiple of this


def kernel_fits(head_dim: int) -> bool:
    """Whether the kernel can serve attention with this head dim here: decided once, when
    an attention module is built (settings.attention_kernel, the kernels built)."""
    return settings.get().attention_kernel and head_dim % LANES == 0 and ext.available()


def takes(x: torch.Tensor, S: int, dropout_p: float) -> bool:
    """Per call, for a module whose head dim fits: CPU float32 outside autocast, at most
    MAX_LEN positions, no dropout (and the kernels not switched off since)."""
    return (dropout_p == 0.0 and x.device.type == "cpu" and x.dtype == torch.float32 and 0 < S <= MAX_LEN
            and not torch.is_autocast_enabled("cpu") and ext.available())


def applies(q_BHSd: torch.Tensor, k_BGLd: torch.Tensor, dropout_p: float) -> bool:
    """For `attend`: a full causal square (no cached keys) the kernel takes."""
    return (k_BGLd.dtype == q_BHSd.dtype and k_BGLd.shape[2] == q_BHSd.shape[2]
            and q_BHSd.shape[1] % k_BGLd.shape[1] == 0 and kernel_fits(q_BHSd.shape[3])
            and takes(q_BHSd, q_BHSd.shape[2], dropout_p))


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


def attend_qkv(qkv_BSX: torch.Tensor, n_heads: int, n_kv_heads: int, cos_SD: torch.Tensor | None,
               sin_SD: torch.Tensor | None, causal: bool = True) -> torch.Tensor:
    """The kernel on a fused projection's output: qkv_BSX = x · [w_q; w_k; w_v]ᵀ, X = (H + 2G)·d.
    Returns (B, S, H·d), ready for the output projection. The gradient comes back as one
    (B, S, X) tensor the kernel writes in place, so the fused projection's backward is one
    product per operand with no slicing copies. For callers that checked
    `kernel_fits` and `takes`."""
    if cos_SD is None:
        cos_SD = sin_SD = qkv_BSX.new_empty(0)
    return _AttentionQKV.apply(qkv_BSX, cos_SD.float().contiguous(), sin_SD.float().contiguous(),
                               n_heads, n_kv_heads, causal)


def split_qkv(qkv_BSX: torch.Tensor, n_heads: int, n_kv_heads: int):
    """q (B, H, S, d), k and v (B, G, S, d) as views of a fused projection's output."""
    B, S, X = qkv_BSX.shape
    d = X // (n_heads + 2 * n_kv_heads)
    heads_BSNd = qkv_BSX.view(B, S, n_heads + 2 * n_kv_heads, d)
    H, G = n_heads, n_kv_heads
    return (heads_BSNd[:, :, :H].transpose(1, 2), heads_BSNd[:, :, H:H + G].transpose(1, 2),
            heads_BSNd[:, :, H + G:].transpose(1, 2))


def reference(q_BHSd, k_BGLd, v_BGLd, cos_SD, sin_SD, causal: bool = True) -> torch.Tensor:
    """models/attention.py's path: rotate, then torch's SDPA (GQA by head groups)."""
    if cos_SD is not None:
        q_BHSd, k_BGLd = rotate(q_BHSd, cos_SD, sin_SD), rotate(k_BGLd, cos_SD, sin_SD)
    return F.scaled_dot_product_attention(q_BHSd, k_BGLd, v_BGLd, is_causal=causal,
                                          enable_gqa=k_BGLd.shape[1] != q_BHSd.shape[1])


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _forward(q_BHSd, k_BGLd, v_BGLd, cos_SD, sin_SD, causal: bool):
    """o (B, H, S, d) in (B, S, H, d) memory and the rows' log-sum-exp (B, H, S)."""
    B, H, S, d = q_BHSd.shape
    o_BHSd = q_BHSd.new_empty(B, S, H, d).transpose(1, 2)
    lse_BHS = q_BHSd.new_empty(B, H, S)
    ext.op("attention_fwd")(q_BHSd, k_BGLd, v_BGLd, cos_SD, sin_SD, cos_SD, sin_SD, o_BHSd, lse_BHS,
                            d ** -0.5, 0, causal)
    return o_BHSd, lse_BHS


def _backward(saved, do_BHSd, dq, dk, dv, causal: bool) -> None:
    q_BHSd, k_BGLd, v_BGLd, cos_SD, sin_SD, o_BHSd, lse_BHS = saved
    ext.op("attention_bwd")(q_BHSd, k_BGLd, v_BGLd, cos_SD, sin_SD, cos_SD, sin_SD, o_BHSd, lse_BHS,
                            _rows(do_BHSd), dq, dk, dv, q_BHSd.shape[-1] ** -0.5, 0, causal)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_BHSd, k_BGLd, v_BGLd, cos_SD, sin_SD, causal: bool):
        q_BHSd, k_BGLd, v_BGLd = _rows(q_BHSd), _rows(k_BGLd), _rows(v_BGLd)
        o_BHSd, lse_BHS = _forward(q_BHSd, k_BGLd, v_BGLd, cos_SD, sin_SD, causal)
        ctx.save_for_backward(q_BHSd, k_BGLd, v_BGLd, cos_SD, sin_SD, o_BHSd, lse_BHS)
        ctx.causal = causal
        return o_BHSd

    @staticmethod
    def backward(ctx, do_BHSd):
        saved = ctx.saved_tensors
        dq, dk, dv = (torch.empty_like(t) for t in saved[:3])  # strides kept
        _backward(saved, do_BHSd, dq, dk, dv, ctx.causal)
        return dq, dk, dv, None, None, None


class _AttentionQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv_BSX, cos_SD, sin_SD, n_heads: int, n_kv_heads: int, causal: bool):
        qkv_BSX = qkv_BSX.contiguous()
        q_BHSd, k_BGSd, v_BGSd = split_qkv(qkv_BSX, n_heads, n_kv_heads)
        o_BHSd, lse_BHS = _forward(q_BHSd, k_BGSd, v_BGSd, cos_SD, sin_SD, causal)
        ctx.save_for_backward(qkv_BSX, cos_SD, sin_SD, o_BHSd, lse_BHS)
        ctx.heads, ctx.causal = (n_heads, n_kv_heads), causal
        B, H, S, d = o_BHSd.shape
        return o_BHSd.transpose(1, 2).view(B, S, H * d)

    @staticmethod
    def backward(ctx, do_BSY):
        qkv_BSX, cos_SD, sin_SD, o_BHSd, lse_BHS = ctx.saved_tensors
        B, H, S, d = o_BHSd.shape
        dqkv_BSX = torch.empty_like(qkv_BSX, memory_format=torch.contiguous_format)  # every element written
        saved = (*split_qkv(qkv_BSX, *ctx.heads), cos_SD, sin_SD, o_BHSd, lse_BHS)
        do_BHSd = do_BSY.reshape(B, S, H, d).transpose(1, 2)
        _backward(saved, do_BHSd, *split_qkv(dqkv_BSX, *ctx.heads), ctx.causal)
        return dqkv_BSX, None, None, None, None, None

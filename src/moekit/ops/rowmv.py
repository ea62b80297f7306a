"""Grouped row mat-vec for decode: y[r] = W[e(r)] · a[r], rows sorted by expert.

The fast path is a small C++ kernel (csrc/rowmv.cpp; why it beats torch's call at
decode sizes is said there), built with moekit's other kernels (ops/ext.py). Without
a build, for other dtypes or devices, or when autograd needs a gradient (the kernel
has no backward: it serves inference only), the torch reference below runs instead.
"""

from __future__ import annotations

import torch

from moekit.ops import ext


def reference(a_RK: torch.Tensor, w_ENK: torch.Tensor, offsets_E1: torch.Tensor) -> torch.Tensor:
    """The obviously-correct version: one matmul per expert that has rows."""
    y_RN = a_RK.new_empty(a_RK.shape[0], w_ENK.shape[1])
    bounds = offsets_E1.tolist()
    for e in range(w_ENK.shape[0]):
        s, t = bounds[e], bounds[e + 1]
        if t > s:
            y_RN[s:t] = a_RK[s:t] @ w_ENK[e].t()
    return y_RN


def applies(a_RK: torch.Tensor, w_ENK: torch.Tensor) -> bool:
    """Whether the compiled kernel takes these operands (and builds it if needed)."""
    if a_RK.device.type != "cpu" or a_RK.dtype != torch.float32 or w_ENK.dtype != torch.float32:
        return False
    if w_ENK.stride(-1) != 1 or (torch.is_grad_enabled() and (a_RK.requires_grad or w_ENK.requires_grad)):
        return False
    return ext.available()


def grouped_rows_linear(a_RK: torch.Tensor, w_ENK: torch.Tensor, offsets_E1: torch.Tensor) -> torch.Tensor:
    """a (R, K) sorted by expert, w (E, N, K), offsets (E + 1,) -> y (R, N) with
    y[r] = w[e] · a[r] for offsets[e] <= r < offsets[e + 1]."""
    if applies(a_RK, w_ENK):
        return ext.op("grouped_rows_linear")(a_RK.contiguous(), w_ENK, offsets_E1.to(torch.int64))
    return reference(a_RK, w_ENK, offsets_E1)

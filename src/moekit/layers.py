"""Linear layers on ops/gemm.py, shared by the MoE layer and the models.

`linear` is F.linear with a hand-written backward whose three products (y = x wᵀ,
dx = dy w, dw = dyᵀ x) all go through ops.gemm, so on CPU they run on oneDNN where
that is faster than torch's MKL call (see ops/gemm.py for the measurements).
`Linear` is an nn.Linear (same parameters, same state-dict keys, same init) whose
forward is that function. Its backward is once-differentiable: for double backward
(gradient penalties, Hessian-vector products) or torch.func transforms, run under
`moekit.settings.use(gemm="torch")`, which makes it F.linear.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from moekit import settings
from moekit.ops import gemm


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_NK, b_N):
        x_MK = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(x_MK, w_NK)
        ctx.has_bias, ctx.in_shape = b_N is not None, x.shape
        return gemm.linear(x_MK, w_NK, b_N).view(*x.shape[:-1], w_NK.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x_MK, w_NK = ctx.saved_tensors
        dy_MN = dy.reshape(-1, w_NK.shape[0])
        need_x, need_w, need_b = ctx.needs_input_grad
        dx = gemm.mm(dy_MN, w_NK).view(ctx.in_shape) if need_x else None
        dw = gemm.mm(dy_MN.t(), x_MK) if need_w else None
        db = dy_MN.sum(0) if need_b and ctx.has_bias else None
        return dx, dw, db


def linear(x: torch.Tensor, w_NK: torch.Tensor, b_N: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) · wᵀ + b -> (..., N); torch's F.linear wherever gemm would not help, and
    under autocast (which then computes in its dtype, as for any nn.Linear)."""
    if (settings.get().gemm == "torch" or x.device.type != "cpu" or x.dtype != w_NK.dtype
            or torch.is_autocast_enabled("cpu")):
        return nn.functional.linear(x, w_NK, b_N)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w_NK, b_N)):
        return _Linear.apply(x, w_NK, b_N)
    # nothing to differentiate (inference): skip the autograd Function's ~15 µs per call
    y = gemm.linear(x.reshape(-1, x.shape[-1]), w_NK, b_N)
    return y.view(*x.shape[:-1], w_NK.shape[0])


class Linear(nn.Linear):
    """nn.Linear whose products go through ops.gemm (a drop-in: same parameters and keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

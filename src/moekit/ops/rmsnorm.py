"""RMSNorm over the last dim: csrc/rmsnorm.cpp (forward and backward one pass each), with
torch's F.rms_norm as the reference and the fallback (other dtypes and devices, autocast,
double backward, no build).

Why a kernel: see csrc/rmsnorm.cpp; torch runs the norm on the CPU as a chain of
elementwise ops, and nine of them sit in a training step of the `tiny` preset.
The kernel's backward is once-differentiable (as layers.Linear's): for double backward
run under `moekit.settings.use(kernels="off")`, which makes this F.rms_norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from moekit.ops import ext


def applies(x: torch.Tensor, w_D: torch.Tensor) -> bool:
    """CPU float32 x and weight, not under autocast, and the kernels built."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and w_D.dtype == torch.float32
            and w_D.dim() == 1 and x.shape[-1] == w_D.numel() and x.numel() > 0
            and not torch.is_autocast_enabled("cpu") and ext.available())


def rms_norm(x: torch.Tensor, w_D: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) · w: the kernel where `applies`, else the reference."""
    if applies(x, w_D):
        return _RMSNorm.apply(x, w_D, eps)
    return reference(x, w_D, eps)


def reference(x: torch.Tensor, w_D: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.shape[-1],), w_D, eps)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_D, eps: float):
        x = x.contiguous()
        y = torch.empty_like(x)
        rstd_N = x.new_empty(x.numel() // x.shape[-1])
        ext.op("rmsnorm_fwd")(x, w_D.contiguous(), eps, y, rstd_N)
        ctx.save_for_backward(x, w_D, rstd_N)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, w_D, rstd_N = ctx.saved_tensors
        dx, dw_D = torch.empty_like(x), torch.empty_like(w_D)
        ext.op("rmsnorm_bwd")(x, w_D.contiguous(), rstd_N, dy.contiguous(), dx, dw_D, ctx.needs_input_grad[1])
        return dx, (dw_D if ctx.needs_input_grad[1] else None), None

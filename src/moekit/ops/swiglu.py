"""SwiGLU of the expert bank in one pass per direction: csrc/swiglu.cpp, with the torch
reference beside it.

h_mN = [g | u] (m rows, N = 2F), the first n rows real and weighted by w_n (the routing
weights), the rest zero padding (moe/experts/cpu/chunked.py):

    forward   a = silu(g) · u · w           (w = 1 where not given)
    backward  given ub = the gradient reaching a·w's factor a (dy · W_out):
              dw = <ub, a> per real row; a_w = a · w; dh = [ub·w·u·silu'(g) | ub·w·silu(g)]

Why a kernel: torch needs 3 passes over the m x F arrays in the forward and 8 in the
backward; the kernel reads each input once. The kernel serves CPU float32; elsewhere,
or without the build (ops/ext.py), the reference runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moekit.ops import ext


def applies(*tensors: torch.Tensor) -> bool:
    """CPU float32 with contiguous rows, and the kernels built."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.stride(-1) == 1
               for t in tensors) and ext.available()


def forward(h_mN: torch.Tensor, w_n: torch.Tensor | None, out_mF: torch.Tensor) -> torch.Tensor:
    """a = silu(g) · u, rows < n times w_n, written into out_mF (returned)."""
    w = h_mN.new_empty(0) if w_n is None else w_n.reshape(-1)
    if applies(h_mN, w, out_mF):
        return kernel_forward(h_mN, w, out_mF)
    return out_mF.copy_(forward_reference(h_mN, w))


def backward(h_mN: torch.Tensor, ub_mF: torch.Tensor, w_n: torch.Tensor, dh_mN: torch.Tensor,
             a_mF: torch.Tensor | None, need_dw: bool) -> torch.Tensor | None:
    """dh into dh_mN; a · w into a_mF when given; returns dw_n (or None)."""
    if applies(h_mN, ub_mF, w_n, dh_mN, *([] if a_mF is None else [a_mF])):
        return kernel_backward(h_mN, ub_mF, w_n, dh_mN, a_mF, need_dw)
    dh, a_w, dw = backward_reference(h_mN, ub_mF, w_n)
    dh_mN.copy_(dh)
    if a_mF is not None:
        a_mF.copy_(a_w)
    return dw.to(h_mN.dtype) if need_dw else None


# The kernel alone, for callers that already checked `applies` (the expert bank, per chunk).
def kernel_forward(h_mN: torch.Tensor, w_n: torch.Tensor | None, out_mF: torch.Tensor) -> torch.Tensor:
    w = h_mN.new_empty(0) if w_n is None else w_n.reshape(-1).contiguous()
    ext.op("swiglu_fwd")(h_mN, w, out_mF)
    return out_mF


def kernel_backward(h_mN, ub_mF, w_n, dh_mN, a_mF, need_dw: bool) -> torch.Tensor | None:
    dw_n = h_mN.new_empty(w_n.numel()) if need_dw else None
    empty = h_mN.new_empty(0)
    ext.op("swiglu_bwd")(h_mN, ub_mF, w_n.reshape(-1).contiguous(), dh_mN,
                         empty if a_mF is None else a_mF, empty if dw_n is None else dw_n,
                         a_mF is not None, need_dw)
    return dw_n


def _row_weights(w_n: torch.Tensor, m: int, pad: float) -> torch.Tensor:
    """w_n as an (m, 1) column, rows n..m set to pad."""
    col = torch.full((m, 1), pad, dtype=w_n.dtype, device=w_n.device)
    col[: w_n.numel(), 0] = w_n.reshape(-1)
    return col


def forward_reference(h_mN: torch.Tensor, w_n: torch.Tensor) -> torch.Tensor:
    g, u = h_mN.chunk(2, dim=-1)
    a = F.silu(g) * u
    return a * _row_weights(w_n, a.shape[0], 1.0) if w_n.numel() else a


def backward_reference(h_mN: torch.Tensor, ub_mF: torch.Tensor, w_n: torch.Tensor):
    """(dh, a · w, dw) by autograd on the forward: obviously the derivative."""
    n = w_n.numel()
    h = h_mN.detach().clone().requires_grad_()
    g, u = h.chunk(2, dim=-1)
    a = F.silu(g) * u
    w = _row_weights(w_n, a.shape[0], 0.0)
    (dh,) = torch.autograd.grad(a, h, ub_mF * w)
    a = a.detach()
    return dh, a * w, (ub_mF[:n] * a[:n]).sum(-1)

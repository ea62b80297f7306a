"""Softmax over the last dim for short rows (a router's E experts) on CPU, with torch's
softmax as the reference and the path everywhere else.

Why: torch's CPU softmax vectorizes along the row, so rows shorter than a vector
register (16 floats) leave it mostly idle: (2048, 8) took 232 µs forward, 323 µs
forward+backward at one thread, against 51 and 174 µs for the same math as whole-tensor
ops (max, sub, exp, sum, div), and this Function's backward is three ops more. From 16
experts up torch's is the faster (4096 x 16 fwd+bwd: 104 vs 239 µs; x 64: 259 vs 876).
"""

from __future__ import annotations

import torch

SHORT = 15  # rows up to this long take the whole-tensor path on CPU (benchmarks/ops_kernels.py)


def softmax(x: torch.Tensor) -> torch.Tensor:
    """torch.softmax(x, dim=-1), faster on CPU for rows of at most SHORT."""
    if x.device.type != "cpu" or x.dim() == 0 or x.shape[-1] > SHORT or x.numel() == 0:
        return torch.softmax(x, dim=-1)
    return _ShortSoftmax.apply(x)


class _ShortSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        e = (x - x.amax(-1, keepdim=True)).exp_()
        p = e.div_(e.sum(-1, keepdim=True))
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        return p * (g - (g * p).sum(-1, keepdim=True))  # differentiable: double backward works

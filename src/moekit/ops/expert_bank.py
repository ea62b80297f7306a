"""Typed faces of the SwiGLU expert-bank kernels (csrc/expert_bank*.cpp), with the torch
reference beside them. moe/experts/cpu/ calls these; nothing else calls the ops.

Rows: a call's routed rows, sorted by expert; row r takes token tok_R[r] with routing
weight weights_R[r]. Segments (S, 4) int64: (expert, first row, end row, first-write).

  forward(...)          whole experts per thread: out[dst[r]] = w_r · swiglu(x W_inᵀ) W_outᵀ
  backward(...)         its gradients (dx rows, routing weights, weight gradients)
  forward_columns(...)  threads own tokens, y[t] += rows (AVX-512 builds only)
  forward_rows(...)     the same on packed weights (AVX-512 builds only; cpu/packed.py)
  reference(...)        the forward in plain torch: what every kernel computes
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from enum import IntEnum

import torch
import torch.nn.functional as F

from moekit.ops import ext


class Engine(IntEnum):
    """The GEMM engine of the whole-experts kernel (csrc/expert_bank.cpp: Engine)."""

    matmul = 0
    micro = 1
    blas = 2


def forward(x_TD: torch.Tensor, tok_R: torch.Tensor, weights_R: torch.Tensor, seg_S4: torch.Tensor,
            w_in: torch.Tensor, w_out: torch.Tensor, out: torch.Tensor, dst_R: torch.Tensor,
            h_blocks: list[torch.Tensor], h_rows: list[int], *, step: int, engine: str, stream: bool) -> None:
    """out[dst_R[r]] = weights_R[r] · expert_e(r)(x_TD[tok_R[r]]); the pre-activations
    into h_blocks (rows from h_rows) when given (the backward reads them)."""
    ext.op("expert_bank_fwd")(x_TD, tok_R, weights_R, seg_S4, w_in, w_out, out, dst_R, h_blocks, h_rows, step,
                              int(Engine[engine]), stream)


def backward(x_TD: torch.Tensor, tok_R: torch.Tensor, weights_R: torch.Tensor, seg_S4: torch.Tensor,
             w_in: torch.Tensor, w_out: torch.Tensor, h_blocks: list[torch.Tensor], h_rows: list[int],
             dy_TD: torch.Tensor, dx_out: torch.Tensor, dst_R: torch.Tensor, dweights_R: torch.Tensor,
             dw_in: torch.Tensor, dw_out: torch.Tensor, *, step: int, engine: str, stream: bool) -> None:
    """Empty outputs are not computed. Weight gradients are written by each expert's
    first-write segment and added to by the others."""
    ext.op("expert_bank_bwd")(x_TD, tok_R, weights_R, seg_S4, w_in, w_out, h_blocks, h_rows, dy_TD, dx_out, dst_R,
                              dweights_R, dw_in, dw_out, step, int(Engine[engine]), stream)


def forward_columns(x_TD: torch.Tensor, tok_R: torch.Tensor, weights_R: torch.Tensor, counts_E: torch.Tensor,
                    w_in: torch.Tensor, w_out: torch.Tensor, y_TD: torch.Tensor, h_blocks: list[torch.Tensor],
                    h_rows: list[int]) -> None:
    ext.op("expert_bank_fwd_cols")(x_TD, tok_R, weights_R, counts_E, w_in, w_out, y_TD, h_blocks, h_rows)


def forward_rows(x_TD: torch.Tensor, tok_R: torch.Tensor, weights_R: torch.Tensor, counts_E: torch.Tensor,
                 p_in: torch.Tensor, p_out: torch.Tensor, y_TD: torch.Tensor) -> None:
    ext.op("expert_bank_fwd_rows")(x_TD, tok_R, weights_R, counts_E, p_in, p_out, y_TD)


def reference(x_TD: torch.Tensor, tok_R: torch.Tensor, weights_R: torch.Tensor, counts_E: torch.Tensor,
              w_in: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """y_TD: the sum over rows of w_r · swiglu(x W_inᵀ) W_outᵀ, one expert at a time."""
    y_TD = torch.zeros_like(x_TD)
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        rows = slice(start, start + n)
        g, u = (x_TD[tok_R[rows]] @ w_in[e].t()).chunk(2, dim=-1)
        y_TD.index_add_(0, tok_R[rows], (F.silu(g) * u) @ w_out[e].t() * weights_R[rows, None])
        start += n
    return y_TD


@functools.cache
def matmul_works() -> bool:
    """Whether oneDNN's matmul runs here: torch refuses it (even for fp32) on CPUs without
    avx512bw/vl/dq or avx_ne_convert, so it is tried once rather than assumed."""
    if not ext.available():
        return False
    try:
        forward_probe("matmul", 16, 16, 4)()
        return True
    except RuntimeError:
        return False


def forward_probe(engine: str, D: int, F: int, rows: int) -> Callable[[], None]:
    """A forward of two experts of `rows` rows each on `engine` (what ops/tune.py times)."""
    g = torch.Generator().manual_seed(0)
    x_TD = torch.randn(2 * rows, D, generator=g)
    w_in, w_out = torch.randn(2, 2 * F, D, generator=g) * 0.02, torch.randn(2, D, F, generator=g) * 0.02
    tok_R = torch.arange(2 * rows)
    weights_R = torch.ones(2 * rows)
    seg_S4 = torch.tensor([[0, 0, rows, 1], [1, rows, 2 * rows, 1]])
    out = torch.empty(2 * rows, D)

    def run() -> None:
        forward(x_TD, tok_R, weights_R, seg_S4, w_in, w_out, out, tok_R, [], [], step=32, engine=engine,
                stream=False)

    return run

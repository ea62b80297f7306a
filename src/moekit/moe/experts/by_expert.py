"""The SwiGLU expert bank on CPU with whole experts handed to threads (ops/csrc/expert_bank.cpp).

Why: grouped.py's chunk loop runs one expert at a time and splits each product between
the threads. With many small experts (the "many" layer: 128 experts of ~256 rows of
width 512) every expert then costs a Python iteration, a gather, two oneDNN calls
whose halves are too small to run at full rate, the SwiGLU and a scatter-add, each
with its own fork and join. Under torch.profiler (benchmarks/profile_layer.py), the
work besides the GEMMs took 22-39 ms of a 66-92 ms forward. Here one C++ call per
chunk of rows gives each thread whole experts: it gathers the expert's rows into its
own buffers, runs both products on its own core through oneDNN, applies the SwiGLU
and the routing weight, and writes the expert's output rows; the chunk's rows are then
added into y by the column-split row kernel (ops/rows.py). The backward does the same
per expert: dy · W_out, the SwiGLU backward, both weight gradients and dx rows.

Memory: each thread keeps its buffers for the next call (about
(largest expert segment, padded) x (3D + 4F) floats in the backward, e.g. 10 MiB per
thread on the fine layer); they only grow.

Every expert's products run on one thread in a fixed order, so results do not depend
on the thread count or the scheduling (exact resume stays exact). grouped.py's loop
is the reference; tests/test_by_expert.py holds the parity tests.
"""

from __future__ import annotations

import os

import torch

from moekit.moe.experts.activations import Activation
from moekit.moe.experts.chunks import plan_chunks
from moekit.moe.types import DispatchPlan
from moekit.ops import ext, gemm, grad_pool
from moekit.ops import rows as row_ops

# rows per call: the chunk's output rows (and its saved pre-activations) stay below
# glibc's mmap threshold and in cache, while a call holds enough experts to keep every
# thread busy
CHUNK_BYTES = 8 * 2**20
MIN_CHUNK_ROWS = 1024
MIN_EXPERTS_PER_THREAD = 2
# rows of each expert are padded to a multiple of this (see ops/gemm.py: SHAPE_STEP)
STEP = gemm.SHAPE_STEP
ENABLED = os.environ.get("MOEKIT_BY_EXPERT", "1") != "0"


def takes(x_TD: torch.Tensor, counts: list[int], w_in_END: torch.Tensor, w_out_EDF: torch.Tensor,
          act: Activation) -> bool:
    """CPU float32 SwiGLU experts with contiguous weights, oneDNN in use, the kernels built,
    and enough experts per call to keep the threads busy."""
    return (ENABLED and act.name == "swiglu" and gemm.onednn_takes(x_TD) and x_TD.dtype == torch.float32
            and w_in_END.dtype == torch.float32 and w_out_EDF.dtype == torch.float32
            and w_in_END.device.type == "cpu" and w_in_END.is_contiguous() and w_out_EDF.is_contiguous()
            and enough_experts(counts, chunk_rows(x_TD, w_in_END.shape[1]))
            and ext.available())


def enough_experts(counts: list[int], rows: int) -> bool:
    """Whether a chunk of `rows` rows holds, on average, MIN_EXPERTS_PER_THREAD experts
    per thread. With fewer (coarse: 8 experts of ~1024 rows, one per chunk) threads sit
    idle, and splitting each product between the threads (grouped.py) is faster: A/B on
    the coarse layer, this path took 1.68x the forward and 1.42x the forward+backward."""
    busy = [c for c in counts if c]
    if not busy:
        return False
    per_chunk = min(len(busy), rows * len(busy) / sum(busy))
    return per_chunk >= MIN_EXPERTS_PER_THREAD * torch.get_num_threads()


def plan_segments(counts: list[int], max_rows: int) -> list[tuple[int, int, torch.Tensor]]:
    """Chunks (row start, row end, seg) over expert-sorted rows; seg (S, 4) int64 holds
    (expert, start, end, first-write) with rows relative to the chunk. A chunk holds at
    most max_rows rows and at most one segment per expert; first-write marks an expert's
    first segment (its weight gradients are written there and added to after)."""
    seen: set[int] = set()
    out = []
    for r0, r1, segs in plan_chunks(counts, max_rows):
        rows = [(e, s, t, int(e not in seen)) for e, s, t in segs]
        seen.update(e for e, _, _ in segs)
        out.append((r0, r1, torch.tensor(rows, dtype=torch.int64)))
    return out


def chunk_rows(x_TD: torch.Tensor, n_in: int) -> int:
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // (4 * max(n_in, x_TD.shape[1])))


class _ByExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_in_END, w_out_EDF, weights_R, token_idx_R, counts):
        x_TD = x_TD.contiguous()
        w_R = weights_R.to(torch.float32).contiguous()
        N = w_in_END.shape[1]
        chunks = plan_segments(counts, chunk_rows(x_TD, N))
        keep_h = any(ctx.needs_input_grad[:4])  # an inference forward saves nothing
        y_TD = x_TD.new_zeros(x_TD.shape)
        out = x_TD.new_empty(min(max(1, token_idx_R.shape[0]), chunks[0][1] if chunks else 1), x_TD.shape[1])
        empty, hs = x_TD.new_empty(0), []
        for r0, r1, seg in chunks:
            tok = token_idx_R[r0:r1].contiguous()
            h_nN = x_TD.new_empty(r1 - r0, N) if keep_h else empty
            ext.op("expert_bank_fwd")(x_TD, tok, w_R[r0:r1], seg, w_in_END, w_out_EDF, out[: r1 - r0],
                                      h_nN, STEP)
            row_ops.index_add_(y_TD, tok, out[: r1 - r0])
            if keep_h:
                hs.append(h_nN)
        ctx.save_for_backward(x_TD, w_in_END, w_out_EDF, w_R, token_idx_R, *hs)
        ctx.chunks, ctx.weights_dtype = chunks, weights_R.dtype
        ctx.idle = [e for e, c in enumerate(counts) if c == 0]  # experts that got no rows
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        x_TD, w_in_END, w_out_EDF, w_R, token_idx_R, *hs = ctx.saved_tensors
        need_x, need_win, need_wout, need_w = ctx.needs_input_grad[:4]
        dy_TD = dy_TD.contiguous()
        empty = x_TD.new_empty(0)
        dx_TD = torch.zeros_like(x_TD) if need_x else None
        dw_in = grad_pool.empty_like(w_in_END) if need_win else empty
        dw_out = grad_pool.empty_like(w_out_EDF) if need_wout else empty
        dw_R = x_TD.new_empty(w_R.shape) if need_w else empty
        rows = ctx.chunks[0][1] if ctx.chunks else 1
        dx_rows = x_TD.new_empty(rows, x_TD.shape[1]) if need_x else empty
        for (r0, r1, seg), h_nN in zip(ctx.chunks, hs, strict=True):
            n, tok = r1 - r0, token_idx_R[r0:r1].contiguous()
            ext.op("expert_bank_bwd")(x_TD, tok, w_R[r0:r1], seg, w_in_END, w_out_EDF, h_nN, dy_TD,
                                      dx_rows[:n] if need_x else empty, dw_R[r0:r1] if need_w else empty,
                                      dw_in, dw_out, STEP)
            if need_x:
                row_ops.index_add_(dx_TD, tok, dx_rows[:n])
        if ctx.idle:  # experts that got no rows have zero gradient (their buffers hold old values)
            idle = torch.tensor(ctx.idle, dtype=torch.int64)
            for g in (dw_in, dw_out):
                if g.numel():
                    g[idle] = 0
        return (dx_TD, dw_in if need_win else None, dw_out if need_wout else None,
                dw_R.to(ctx.weights_dtype) if need_w else None, None, None)


def by_expert_experts(x_TD: torch.Tensor, plan: DispatchPlan, counts: list[int], w_in_END: torch.Tensor,
                      w_out_EDF: torch.Tensor) -> torch.Tensor:
    return _ByExpertFFN.apply(x_TD, w_in_END, w_out_EDF, plan.weights_R, plan.token_idx_R, counts)

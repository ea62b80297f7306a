"""Whole experts per thread (ops/csrc/expert_bank.cpp), and the forwards with threads
owning tokens (expert_bank_cols.cpp, expert_bank_rows.cpp): the CPU wing's SwiGLU paths
"whole", "columns" and "rows" (cpu/path.py says when each runs).

whole: the chunk loop (cpu/chunked.py) runs one expert at a time and splits each product
between the threads. With many small experts (the "many" layer: 128 experts of ~256
rows of width 512) every expert then costs a Python iteration, a gather, two products
whose halves are too small to run at full rate, the SwiGLU and a scatter-add, each with
its own fork and join (under torch.profiler: 22-39 ms of a 66-92 ms forward). Here C++
calls give each thread whole experts: it gathers the expert's rows into its own
buffers, runs both products on its own core (path.products: micro, matmul or blas),
applies the SwiGLU and the routing weight, and writes the expert's output rows. The
backward does the same per expert: dy · W_out, the SwiGLU backward, both weight
gradients and dx rows. Every expert's products run on one thread in a fixed order, so
results do not depend on the thread count (exact resume stays exact).

The combine (path.combine): "slots" writes each output row to its slot t·K + k of a
(T·K, D) buffer and y is each token's K slots summed in order (ops/rows.py: sum_slots;
the gather-then-sum "unpermute" of Megatron-Core and torchtitan): y is written once,
with no zero fill and no read-modify-write (5 `tiny` training steps: 0.971-0.986 of
the scatter's time). One kernel call then covers every chunk, so the threads join once
per forward and once per backward. "scatter" (a buffer past SLOT_MAX_BYTES, or a plan
without a slot count) scatter-adds each chunk's rows into a zeroed y. Slot buffers
from STREAM_MIN_BYTES up are written with non-temporal stores (`path.stream`).

columns / rows: each thread owns a range of tokens and runs every expert on its own
tokens' rows, adding each output row straight into y (no slot buffer, no sum);
columns keeps the weights as they lie and puts activations in columns (a training
forward also writes the pre-activations whole's backward reads), rows broadcasts token
rows against a packed copy of the weights (cpu/packed.py, made by
`prepare_for_inference`). Both need AVX-512. docs/design.md has their measurements.

Memory: each thread keeps its buffers for the next call (about (largest expert segment,
padded) x (3D + 4F) floats in the backward, e.g. 10 MiB per thread on the fine layer).
"""

from __future__ import annotations

import torch

from moekit.moe.experts.cpu.chunks import plan_chunks
from moekit.moe.experts.cpu.path import CpuPath
from moekit.moe.types import DispatchPlan
from moekit.ops import expert_bank as bank_ops
from moekit.ops import grad_pool
from moekit.ops import rows as row_ops


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


class _Combine:
    """Where a chunk's output (or dx) rows go, and how they become (T, D) rows."""

    def __init__(self, like_TD: torch.Tensor, token_idx_R: torch.Tensor, slot_idx_R: torch.Tensor, top_k: int,
                 path: CpuPath) -> None:
        T, D = like_TD.shape
        self.K = top_k if path.combine == "slots" else 0
        self.tok, self.slot, self.stream = token_idx_R, slot_idx_R, path.stream and self.K > 0
        if self.K:
            self.buf = row_ops.slot_buffer(T * self.K, D, like_TD, zero=slot_idx_R.shape[0] < T * self.K)
        else:
            self.y = like_TD.new_zeros(T, D)
            self.buf = like_TD.new_empty(max(1, min(token_idx_R.shape[0], path.chunk_rows)), D)
            self.rows = torch.arange(self.buf.shape[0])  # a chunk's rows go to buffer rows 0..n-1

    def dst(self, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(out, dst) for the kernel: rows r0..r1 go to out[dst]."""
        if self.K:
            return self.buf, self.slot[r0:r1].contiguous()
        return self.buf, self.rows[: r1 - r0]

    def chunk_done(self, r0: int, r1: int) -> None:
        if not self.K:
            row_ops.index_add_(self.y, self.tok[r0:r1], self.buf[: r1 - r0])

    def result(self) -> torch.Tensor:
        return row_ops.sum_slots(self.buf, self.K) if self.K else self.y


def _calls(chunks: list[tuple[int, int, torch.Tensor]], one: bool, hs: list[torch.Tensor]):
    """The kernel calls over the chunks: (row start, row end, seg, h blocks, their first rows).
    one: a single call over all rows (segments with rows of the call, each chunk's h a
    block); else a call per chunk, its rows as the call's."""
    if not one:
        for c, (r0, r1, seg) in enumerate(chunks):
            yield r0, r1, seg, hs[c:c + 1], [0] if hs else []
        return
    if chunks:
        seg = torch.cat([seg + torch.tensor([0, r0, r0, 0]) for r0, _, seg in chunks])
        yield 0, chunks[-1][1], seg, hs, [r0 for r0, _, _ in chunks] if hs else []


class _WholeFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_in_END, w_out_EDF, weights_R, token_idx_R, slot_idx_R, top_k, counts, grad_on,
                path: CpuPath, packed):
        x_TD = x_TD.contiguous()
        w_R = weights_R.to(torch.float32).contiguous()
        N = w_in_END.shape[1]
        # an inference forward saves nothing. needs_input_grad alone does not tell: under
        # no_grad it still says which inputs require grad, so the caller passes the grad mode
        keep_h = grad_on and any(ctx.needs_input_grad[:4])
        owned = path.kernel in ("rows", "columns")
        # the forwards that own tokens need no chunks but for the saved pre-activations
        # (planning them took ~0.25 ms of a `many` inference forward)
        chunks = plan_segments(counts, path.chunk_rows) if keep_h or not owned else []
        # the saved pre-activations in a block per chunk (each below glibc's mmap threshold)
        hs = [x_TD.new_empty(r1 - r0, N) for r0, r1, _ in chunks] if keep_h else []
        counts_E = torch.tensor(counts, dtype=torch.int64)
        if path.kernel == "rows":
            y_TD = torch.empty_like(x_TD)
            bank_ops.forward_rows(x_TD, token_idx_R, w_R, counts_E, *packed, y_TD)
        elif path.kernel == "columns":
            y_TD = torch.empty_like(x_TD)
            bank_ops.forward_columns(x_TD, token_idx_R, w_R, counts_E, w_in_END, w_out_EDF, y_TD, hs,
                                     [r0 for r0, _, _ in chunks] if hs else [])
        else:
            combine = _Combine(x_TD, token_idx_R, slot_idx_R, top_k, path)
            for r0, r1, seg, h, h_rows in _calls(chunks, combine.K > 0, hs):
                bank_ops.forward(x_TD, token_idx_R[r0:r1].contiguous(), w_R[r0:r1], seg, w_in_END, w_out_EDF,
                                 *combine.dst(r0, r1), h, h_rows, step=path.pad, engine=path.products,
                                 stream=combine.stream)
                combine.chunk_done(r0, r1)
            y_TD = combine.result()
        ctx.save_for_backward(x_TD, w_in_END, w_out_EDF, w_R, token_idx_R, slot_idx_R, *hs)
        ctx.chunks, ctx.weights_dtype, ctx.top_k, ctx.path = chunks, weights_R.dtype, top_k, path
        # experts that got no rows (counts may stop before the last experts)
        ctx.idle = [e for e in range(w_in_END.shape[0]) if e >= len(counts) or counts[e] == 0]
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        x_TD, w_in_END, w_out_EDF, w_R, token_idx_R, slot_idx_R, *hs = ctx.saved_tensors
        need_x, need_win, need_wout, need_w = ctx.needs_input_grad[:4]
        path: CpuPath = ctx.path
        dy_TD = dy_TD.contiguous()
        empty = x_TD.new_empty(0)
        dw_in = grad_pool.empty_like(w_in_END) if need_win else empty
        dw_out = grad_pool.empty_like(w_out_EDF) if need_wout else empty
        dw_R = x_TD.new_empty(w_R.shape) if need_w else empty
        dx = _Combine(x_TD, token_idx_R, slot_idx_R, ctx.top_k, path) if need_x else None
        for r0, r1, seg, h, h_rows in _calls(ctx.chunks, dx is None or dx.K > 0, hs):
            bank_ops.backward(x_TD, token_idx_R[r0:r1].contiguous(), w_R[r0:r1], seg, w_in_END, w_out_EDF, h,
                              h_rows, dy_TD, *(dx.dst(r0, r1) if need_x else (empty, empty)),
                              dw_R[r0:r1] if need_w else empty, dw_in, dw_out, step=path.pad,
                              engine=path.products, stream=dx is not None and dx.stream)
            if need_x:
                dx.chunk_done(r0, r1)
        dx_TD = dx.result() if need_x else None
        if ctx.idle:  # experts that got no rows have zero gradient (their buffers hold old values)
            idle = torch.tensor(ctx.idle, dtype=torch.int64)
            for g in (dw_in, dw_out):
                if g.numel():
                    g[idle] = 0
        return (dx_TD, dw_in if need_win else None, dw_out if need_wout else None,
                dw_R.to(ctx.weights_dtype) if need_w else None, None, None, None, None, None, None, None)


def whole_experts(x_TD: torch.Tensor, plan: DispatchPlan, counts: list[int], w_in_END: torch.Tensor,
                  w_out_EDF: torch.Tensor, path: CpuPath, packed: tuple | None = None) -> torch.Tensor:
    """path.kernel in (whole, columns, rows); rows needs the packed weights."""
    return _WholeFFN.apply(x_TD, w_in_END, w_out_EDF, plan.weights_R, plan.token_idx_R, plan.slot_idx_R,
                           plan.top_k, counts, torch.is_grad_enabled(), path, packed)

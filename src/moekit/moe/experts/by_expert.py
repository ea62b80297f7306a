"""The SwiGLU expert bank on CPU with whole experts handed to threads (ops/csrc/expert_bank.cpp).

Why: grouped.py's chunk loop runs one expert at a time and splits each product between
the threads. With many small experts (the "many" layer: 128 experts of ~256 rows of
width 512) every expert then costs a Python iteration, a gather, two oneDNN calls
whose halves are too small to run at full rate, the SwiGLU and a scatter-add, each
with its own fork and join. Under torch.profiler (benchmarks/profile_layer.py), the
work besides the GEMMs took 22-39 ms of a 66-92 ms forward. Here C++ calls give each
thread whole experts: it gathers the expert's rows into its
own buffers, runs both products on its own core through oneDNN (its brgemm
micro-kernel for experts that fit in L2, ops/gemm.py: bank_micro_kernel), applies the SwiGLU
and the routing weight, and writes the expert's output rows. The backward does the same
per expert: dy · W_out, the SwiGLU backward, both weight gradients and dx rows.

The combine: each output row goes to its slot t·K + k of a (T·K, D) buffer, and y is
each token's K slots summed in order (ops/rows.py: sum_slots; the gather-then-sum
"unpermute" of Megatron-Core and torchtitan). Each y row is written once: no zero fill
of y and no read-modify-write of it, which scattering rows into y needs. A/B of whole
`tiny` training steps (2 threads, ABBA, 16 rounds of 5 steps, twice): 0.986 and 0.971
of the scatter's time. With glibc's thresholds set (training/heap.py) it also pays on
bigger layers, whose slot buffer streams through memory: "many" (64 MiB of slots)
forward 0.951 and 0.946 (30 ABBA rounds each), forward+backward 0.989; "fine"
(128 MiB) 0.980 and 0.984. (Under glibc's defaults the many forward had measured 1.046
and 1.114.) Past SLOT_MAX_BYTES (twice the largest buffer measured) the memory is not
spent: such layers, and plans without a slot count (top_k 0), scatter-add each
chunk's rows, 8 MiB at a time, into a zeroed y (ops/rows.py: index_add_). Where some slots hold no
row (drops) the buffer is zeroed first. dx goes the same way. Slot buffers from
STREAM_MIN_BYTES up are written with non-temporal stores (expert_bank.cpp: scatter_rows).

Calls: the rows are planned in chunks of about CHUNK_BYTES (a big expert split into
segments across chunks), which bound the threads' buffers and the blocks of the saved
pre-activations (each below glibc's mmap threshold). With a slot buffer, one kernel
call covers every chunk: the threads join once per forward and once per backward
rather than once per chunk, each time waiting for the other's last expert. The
backward hands an expert's segments to one thread together (they write the same weight
gradients). Measured on "many" (8 chunks; `benchmarks/ab.py --switch onecall`, ABBA
in one process): forward+backward 0.982, 0.982 and 0.995 of the per-chunk calls' time,
forward 0.994 and 0.977, on a noisy machine; "fine" forward+backward 0.967; 5 `tiny`
training steps 1.003 (one chunk there). The scatter path still calls once per chunk.

Memory: each thread keeps its buffers for the next call (about
(largest expert segment, padded) x (3D + 4F) floats in the backward, e.g. 10 MiB per
thread on the fine layer); they only grow.

Forwards of micro-kernel experts take another kernel, ops/csrc/expert_bank_cols.cpp:
threads own tokens, run every expert on their tokens' rows in columns, and add the
output rows straight into y, with no slot buffer; a training forward also writes the
pre-activations the backward above reads (see _columns and docs/design.md). `many`
inference forward: 0.887 and 0.908 of the time.

Inference forwards on weights met unchanged before, in models up to ROWS_MAX_D wide, run
in rows instead, on a packed copy of the weights (ops/csrc/expert_bank_rows.cpp,
packed.py): threads own tokens as in columns, but nothing is padded to whole vectors or
transposed, and experts too big for the micro-kernel take it too. Inference forward,
benchmarks/ab.py --switch packed: `many` 0.890-0.920 of the column kernel's time, `fine`
0.889 of the whole-experts path's.

Every expert's products run on one thread in a fixed order, so results do not depend
on the thread count or the scheduling (exact resume stays exact). grouped.py's loop
is the reference; tests/test_by_expert.py holds the parity tests.
"""

from __future__ import annotations

import functools
import os

import torch

from moekit.moe.experts import packed
from moekit.moe.experts.activations import Activation
from moekit.moe.experts.chunks import plan_chunks
from moekit.moe.types import DispatchPlan
from moekit.ops import ext, gemm, grad_pool
from moekit.ops import rows as row_ops

# rows per call: the chunk's output rows (and its saved pre-activations) stay below
# glibc's mmap threshold and in cache, while a call holds enough experts to keep every
# thread busy
CHUNK_BYTES = 8 * 2**20
# the largest (T·K, D) slot buffer the combine sums from (see the docstring)
SLOT_MAX_BYTES = 256 * 2**20
# slot buffers from this size up are written with non-temporal stores (expert_bank.cpp:
# scatter_rows): they outgrow the caches (32 MiB of L3 on the reference machine) before
# the sum reads them back. Smaller ones (a `tiny` layer's: 2 MiB) stay in cache for it.
STREAM_MIN_BYTES = 16 * 2**20
MIN_CHUNK_ROWS = 1024
MIN_EXPERTS_PER_THREAD = 2
# rows of each expert are padded to a multiple of this (see ops/gemm.py: SHAPE_STEP)
STEP = gemm.SHAPE_STEP
ENABLED = os.environ.get("MOEKIT_BY_EXPERT", "1") != "0"
# with a slot buffer, one kernel call over all chunks (False: a call per chunk, as the
# scatter path does; benchmarks/ab.py --switch onecall)
ONE_CALL = True
# forwards of micro-kernel experts with threads owning tokens, in columns
# (ops/csrc/expert_bank_cols.cpp; benchmarks/ab.py --switch columns)
COLUMNS = os.environ.get("MOEKIT_COLUMNS", "1") != "0"
# inference forwards on weights met unchanged before: in rows, on a packed copy of the
# weights (ops/csrc/expert_bank_rows.cpp, moe/experts/packed.py; ab.py --switch packed)
ROWS = os.environ.get("MOEKIT_ROWS", "1") != "0"
# the widest model that forward takes. Its pieces hold 384 KiB of x rows (96 rows at
# D = 1024), and each piece streams its expert's weights in again: in-process A/B of the
# forward against the paths above (T = 1024): D = 1024, E = 64, k = 8, F = 352: 0.763
# (0.849 at T = 4096, 0.727 at T = 512); D = 2048 (pieces of 48 rows), E = 64, k = 8,
# F = 704: 1.119; E = 32, k = 4, F = 1408: 1.162.
ROWS_MAX_D = 1024


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


class _Combine:
    """Where a chunk's output (or dx) rows go, and how they become (T, D) rows.

    With a slot count K: every row to its slot t·K + k of one (T·K, D) buffer, summed per
    token at the end. Without: rows to a chunk buffer, scatter-added into a zeroed y."""

    def __init__(self, like_TD: torch.Tensor, token_idx_R: torch.Tensor, slot_idx_R: torch.Tensor, top_k: int,
                 chunk_rows: int) -> None:
        T, D = like_TD.shape
        slot_bytes = T * top_k * D * like_TD.element_size()
        if slot_bytes > SLOT_MAX_BYTES:
            top_k = 0
        self.tok, self.slot, self.K = token_idx_R, slot_idx_R, top_k
        self.stream = top_k > 0 and slot_bytes >= STREAM_MIN_BYTES
        if top_k:
            self.buf = row_ops.slot_buffer(T * top_k, D, like_TD, zero=slot_idx_R.shape[0] < T * top_k)
        else:
            self.y = like_TD.new_zeros(T, D)
            self.buf = like_TD.new_empty(max(1, min(token_idx_R.shape[0], chunk_rows)), D)
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


def _columns(x_TD: torch.Tensor, micro: bool) -> bool:
    """Whether the forward runs with threads owning tokens, in columns: experts on the
    micro-kernel (their weights fit a core's L2, so a thread that runs them all re-reads
    little), a model width of whole 16-float vectors, and a build with AVX-512."""
    return COLUMNS and micro and x_TD.shape[1] % 16 == 0 and _columns_built()


def _packed(x_TD: torch.Tensor, w_in_END: torch.Tensor, w_out_EDF: torch.Tensor,
            keep_h: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The packed weights when the forward runs in rows (ops/csrc/expert_bank_rows.cpp):
    an inference forward, D and F multiples of 16, D at most ROWS_MAX_D, an AVX-512
    build, and weights met unchanged before (packed.py: packed). A training forward drops
    the packed copy."""
    if keep_h:
        packed.forget(w_in_END)
        return None
    D, F = x_TD.shape[1], w_out_EDF.shape[2]
    if not (ROWS and D % 16 == 0 and F % 16 == 0 and D <= ROWS_MAX_D and _columns_built()):
        return None
    return packed.packed(w_in_END, w_out_EDF)


@functools.cache
def _columns_built() -> bool:
    return ext.available() and bool(ext.op("expert_bank_cols_built")(torch.empty(0)))


class _ByExpertFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_in_END, w_out_EDF, weights_R, token_idx_R, slot_idx_R, top_k, counts, grad_on):
        x_TD = x_TD.contiguous()
        w_R = weights_R.to(torch.float32).contiguous()
        N = w_in_END.shape[1]
        # an inference forward saves nothing. needs_input_grad alone does not tell: under
        # no_grad it still says which inputs require grad, so the caller passes the grad mode
        keep_h = grad_on and any(ctx.needs_input_grad[:4])
        micro = gemm.bank_micro_kernel(x_TD.shape[1], N)
        columns = _columns(x_TD, micro)
        p_in_out = _packed(x_TD, w_in_END, w_out_EDF, keep_h)
        # the forwards that own tokens need no chunks but for the saved pre-activations
        # (planning them took ~0.25 ms of a `many` inference forward)
        chunks = plan_segments(counts, chunk_rows(x_TD, N)) if keep_h or not (columns or p_in_out is not None) \
            else []
        # the saved pre-activations in a block per chunk (each below glibc's mmap threshold)
        hs = [x_TD.new_empty(r1 - r0, N) for r0, r1, _ in chunks] if keep_h else []
        if p_in_out is not None:
            y_TD = torch.empty_like(x_TD)
            ext.op("expert_bank_fwd_rows")(x_TD, token_idx_R, w_R, torch.tensor(counts, dtype=torch.int64),
                                           *p_in_out, y_TD)
        elif columns:
            y_TD = torch.empty_like(x_TD)
            ext.op("expert_bank_fwd_cols")(x_TD, token_idx_R, w_R, torch.tensor(counts, dtype=torch.int64),
                                           w_in_END, w_out_EDF, y_TD, hs, [r0 for r0, _, _ in chunks] if hs else [])
        else:
            combine = _Combine(x_TD, token_idx_R, slot_idx_R, top_k, chunks[0][1] if chunks else 1)
            for r0, r1, seg, h, h_rows in _calls(chunks, ONE_CALL and combine.K > 0, hs):
                ext.op("expert_bank_fwd")(x_TD, token_idx_R[r0:r1].contiguous(), w_R[r0:r1], seg, w_in_END,
                                          w_out_EDF, *combine.dst(r0, r1), h, h_rows, STEP, micro, combine.stream)
                combine.chunk_done(r0, r1)
            y_TD = combine.result()
        ctx.save_for_backward(x_TD, w_in_END, w_out_EDF, w_R, token_idx_R, slot_idx_R, *hs)
        ctx.chunks, ctx.weights_dtype, ctx.top_k, ctx.micro = chunks, weights_R.dtype, top_k, micro
        # experts that got no rows (counts may stop before the last experts)
        ctx.idle = [e for e in range(w_in_END.shape[0]) if e >= len(counts) or counts[e] == 0]
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        x_TD, w_in_END, w_out_EDF, w_R, token_idx_R, slot_idx_R, *hs = ctx.saved_tensors
        need_x, need_win, need_wout, need_w = ctx.needs_input_grad[:4]
        dy_TD = dy_TD.contiguous()
        empty = x_TD.new_empty(0)
        dw_in = grad_pool.empty_like(w_in_END) if need_win else empty
        dw_out = grad_pool.empty_like(w_out_EDF) if need_wout else empty
        dw_R = x_TD.new_empty(w_R.shape) if need_w else empty
        dx = _Combine(x_TD, token_idx_R, slot_idx_R, ctx.top_k, ctx.chunks[0][1] if ctx.chunks else 1) \
            if need_x else None
        for r0, r1, seg, h, h_rows in _calls(ctx.chunks, ONE_CALL and (dx is None or dx.K > 0), hs):
            ext.op("expert_bank_bwd")(x_TD, token_idx_R[r0:r1].contiguous(), w_R[r0:r1], seg, w_in_END, w_out_EDF,
                                      h, h_rows, dy_TD, *(dx.dst(r0, r1) if need_x else (empty, empty)),
                                      dw_R[r0:r1] if need_w else empty, dw_in, dw_out, STEP, ctx.micro,
                                      dx is not None and dx.stream)
            if need_x:
                dx.chunk_done(r0, r1)
        dx_TD = dx.result() if need_x else None
        if ctx.idle:  # experts that got no rows have zero gradient (their buffers hold old values)
            idle = torch.tensor(ctx.idle, dtype=torch.int64)
            for g in (dw_in, dw_out):
                if g.numel():
                    g[idle] = 0
        return (dx_TD, dw_in if need_win else None, dw_out if need_wout else None,
                dw_R.to(ctx.weights_dtype) if need_w else None, None, None, None, None, None)


def by_expert_experts(x_TD: torch.Tensor, plan: DispatchPlan, counts: list[int], w_in_END: torch.Tensor,
                      w_out_EDF: torch.Tensor) -> torch.Tensor:
    return _ByExpertFFN.apply(x_TD, w_in_END, w_out_EDF, plan.weights_R, plan.token_idx_R, plan.slot_idx_R,
                              plan.top_k, counts, torch.is_grad_enabled())

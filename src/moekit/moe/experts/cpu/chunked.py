"""The chunk loop: gather -> GEMM -> activation -> GEMM -> weighted scatter-add, fused in
one autograd Function and walked in row chunks. Every dtype and activation; the CPU
wing's reference (tests compare the other paths with it, and it with the loop oracle).

Why chunks: every temporary of the obvious version (x_RD, h_RN, out_RD) is R rows
long; on CPU each one past glibc's 32 MiB mmap threshold is a fresh mapping whose
pages fault in on first touch, which cost 15-19% of the fine config (BENCHMARKS.md).
Walking the expert-sorted rows in chunks of `path.chunk_rows` keeps every temporary
small, and the gather/scatter of a chunk stays in cache. The chunk buffers are
allocated once per call and reused by every chunk (a `_Scratch`).

Why a hand-written backward: autograd on the obvious graph keeps x_RD, h_RN, a_RF and
out_RD alive. Here only h_RN (the pre-activation) is saved, and only when a gradient is
needed (an inference forward keeps nothing). The gradient of the routing weights needs
<dy_t, out_r>; since out_r = a_r W_outᵀ, it equals <dy_t W_out, a_r>, and dy_t W_out is
the product backward computes anyway, so out_RD is never stored.

The routing weight scales a_RF (or out_RD, whichever is narrower) once, since
out = (w·a) W_outᵀ. SwiGLU on CPU float32 runs in ops/swiglu.py's kernel (one pass each
way against torch's 3 and 8); the torch ops stay for other dtypes and activations.

Products (`path.products`): "onednn" gives each expert its own chunk and pads its rows
with zero rows to a multiple of `path.pad` (oneDNN compiles a kernel per shape; zero
rows stay zero through every stage and add nothing to the weight gradients), using each
product's fresh output as is (oneDNN has no out=); "torch" lets a chunk hold several
experts and writes every product into slices of the chunk buffers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from moekit.moe.experts.activations import ACTIVATIONS, Activation
from moekit.moe.experts.cpu.chunks import Segments, plan_chunks
from moekit.moe.experts.cpu.path import CpuPath
from moekit.moe.types import DispatchPlan
from moekit.ops import gemm, grad_pool, swiglu
from moekit.ops import rows as row_ops


class _Scratch:
    """Chunk buffers allocated once per call, handed out as views of the first n rows."""

    def __init__(self, like: torch.Tensor, rows: int) -> None:
        self.like, self.rows, self.bufs = like, rows, {}

    def get(self, name: str, n: int, width: int) -> torch.Tensor:
        buf = self.bufs.get(name)
        if buf is None or buf.shape[1] != width:
            buf = self.bufs[name] = self.like.new_empty(self.rows, width)
        return buf[:n]

    def gather(self, name: str, src_TW: torch.Tensor, tok_n: torch.Tensor, m: int) -> torch.Tensor:
        """src rows tok into the first n rows, zeros in rows n..m (the padding)."""
        n = tok_n.shape[0]
        out = self.get(name, m, src_TW.shape[1])
        torch.index_select(src_TW, 0, tok_n, out=out[:n])
        if m > n:
            out[n:].zero_()
        return out


def _seg_mm(a: torch.Tensor, w_E: torch.Tensor, segs: Segments, out: torch.Tensor | None,
            transpose: bool) -> torch.Tensor:
    """Row block of each segment times its expert's weight (transposed if asked), into
    out; out=None (onednn: one segment over all of a's rows) returns oneDNN's fresh output."""
    if out is None:
        (e, _, _), = segs
        return gemm.onednn_mm(a, w_E[e].t() if transpose else w_E[e])
    for e, s, t in segs:
        torch.mm(a[s:t], w_E[e].t() if transpose else w_E[e], out=out[s:t])
    return out


def _fused_swiglu(act: Activation, *tensors: torch.Tensor) -> bool:
    """SwiGLU on CPU float32: ops/swiglu.py's one-pass kernel instead of torch's passes."""
    return act.name == "swiglu" and swiglu.applies(*tensors)


def _act_fwd(act: Activation, h_mN: torch.Tensor, a_mF: torch.Tensor, w_n1: torch.Tensor | None = None,
             s_mF: torch.Tensor | None = None):
    """a = act(h) written into a_mF, its first len(w_n1) rows times w_n1 when given; for
    SwiGLU off the kernel also silu(gate) into s_mF when given."""
    if s_mF is None and _fused_swiglu(act, h_mN, a_mF):
        return swiglu.kernel_forward(h_mN, w_n1, a_mF)
    if act.name != "swiglu":
        a_mF.copy_(act.fwd(h_mN))
    else:
        F = a_mF.shape[1]
        s = torch.ops.aten.silu.out(h_mN[:, :F], out=a_mF if s_mF is None else s_mF)
        torch.mul(s, h_mN[:, F:], out=a_mF)
    if w_n1 is not None:
        a_mF[: w_n1.shape[0]].mul_(w_n1)
    return a_mF


def _act_grads(act: Activation, h_mN, u_mF, w_n1, scratch: _Scratch, need_w: bool, need_a: bool):
    """From u = dy · W_out (the gradient reaching a·w, before w): dh (padding rows zero),
    a·w (when need_a: dW_out's left operand) and the routing-weight gradient <u, a> of
    the n real rows (when need_w). Returns (dh_mN, aw_mF or None, dweights_n or None)."""
    (m, Fh), n, N = u_mF.shape, w_n1.shape[0], h_mN.shape[1]
    dh_mN, a_mF = scratch.get("dh", m, N), scratch.get("a", m, Fh)
    if _fused_swiglu(act, h_mN, u_mF, dh_mN, a_mF):
        dw_n = swiglu.kernel_backward(h_mN, u_mF, w_n1, dh_mN, a_mF if need_a else None, need_w)
        return dh_mN, a_mF if need_a else None, dw_n
    s_mF = scratch.get("s", m, Fh) if act.name == "swiglu" else None
    a_mF = _act_fwd(act, h_mN, a_mF, s_mF=s_mF)  # recomputed, not saved
    dw_n = torch.linalg.vecdot(u_mF[:n], a_mF[:n]) if need_w else None
    if need_a:
        a_mF[:n].mul_(w_n1)
    u_mF[:n].mul_(w_n1)
    if act.name != "swiglu":
        dh_mN.copy_(act.bwd(h_mN, u_mF))
    else:  # a_mF is spent when not needed; else "s2" takes the d silu(g) temporary
        tmp_mF = scratch.get("s2", m, Fh) if need_a else a_mF
        torch.mul(u_mF, s_mF, out=dh_mN[:, Fh:])  # d up = da · silu(g)
        torch.mul(u_mF, h_mN[:, Fh:], out=tmp_mF)  # d silu(g) = da · up
        torch.ops.aten.silu_backward.grad_input(tmp_mF, h_mN[:, :Fh], grad_input=dh_mN[:, :Fh])
    if m > n:  # the padding rows: zero, whatever the activation's slope at 0
        dh_mN[n:].zero_()
    return dh_mN, a_mF if need_a else None, dw_n


class _ChunkedFFN(torch.autograd.Function):
    """Rows r0..r1 of a chunk are n real rows, padded to m (m = n off the padded path)."""

    @staticmethod
    def forward(ctx, x_TD, w_in_END, w_out_EDF, weights_R, token_idx_R, counts, act_name, grad_on, path):
        act: Activation = ACTIVATIONS.get(act_name)
        T, D = x_TD.shape
        N, Fh = w_in_END.shape[1], w_out_EDF.shape[2]
        onednn = path.products == "onednn"
        pad, rows = path.pad if onednn else 1, path.chunk_rows
        chunks = plan_chunks(counts, rows, one_expert=onednn)
        keep_h = grad_on and any(ctx.needs_input_grad[:4])  # an inference forward saves nothing
        scratch = _Scratch(x_TD, _round_up(min(rows, max(1, token_idx_R.shape[0])), pad))
        w_R1 = weights_R.to(x_TD.dtype).unsqueeze(1)
        y_TD = x_TD.new_zeros(T, D)
        hs = []
        for r0, r1, segs in chunks:
            n, tok, w_n1 = r1 - r0, token_idx_R[r0:r1], w_R1[r0:r1]
            m = _padded_rows(n, pad)
            x_mD = scratch.gather("xo", x_TD, tok, m)
            h_out = None if onednn else x_TD.new_empty(n, N) if keep_h else scratch.get("h", n, N)
            h_mN = _seg_mm(x_mD, w_in_END, segs, h_out, transpose=True)
            # out = (w·a) W_outᵀ: the weight scales the narrower of a and out
            a_mF = _act_fwd(act, h_mN, scratch.get("a", m, Fh), w_n1 if Fh <= D else None)
            o_out = None if onednn else scratch.get("xo", n, D)  # x_nD is spent: its buffer takes the output
            o_mD = _seg_mm(a_mF, w_out_EDF, segs, o_out, transpose=True)
            if Fh > D:
                o_mD[:n].mul_(w_n1)
            row_ops.index_add_(y_TD, tok, o_mD[:n])
            if keep_h:
                hs.append(h_mN)
        # hs go through save_for_backward (not a ctx attribute) so autograd frees them
        # with the graph and a retain_graph=True backward can run twice (gradcheck does)
        ctx.save_for_backward(x_TD, w_in_END, w_out_EDF, weights_R, token_idx_R, *hs)
        ctx.chunks, ctx.act, ctx.rows, ctx.pad, ctx.onednn = chunks, act, rows, pad, onednn
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        x_TD, w_in_END, w_out_EDF, weights_R, token_idx_R, *hs = ctx.saved_tensors
        act: Activation = ctx.act
        pad, onednn = ctx.pad, ctx.onednn
        need_x, need_win, need_wout, need_w = ctx.needs_input_grad[:4]
        dy_TD = dy_TD.contiguous()
        Fh = w_out_EDF.shape[2]
        dx_TD = torch.zeros_like(x_TD) if need_x else None
        # E times an FFN's weights: reused buffers, not fresh pages each step (ops/grad_pool.py)
        dw_in = grad_pool.empty_like(w_in_END) if need_win else None
        dw_out = grad_pool.empty_like(w_out_EDF) if need_wout else None
        dweights_R = x_TD.new_empty(weights_R.shape) if need_w else None
        # first write per expert is a plain product, later ones add: no zero-filled weight grads
        # (counts may stop before the last experts: those get zero gradients too)
        E = w_in_END.shape[0]
        touched_in, touched_out = [False] * E, [False] * E
        w_R1 = weights_R.to(x_TD.dtype).unsqueeze(1)
        scratch = _Scratch(x_TD, _round_up(min(ctx.rows, max(1, token_idx_R.shape[0])), pad))
        for (r0, r1, segs), h_mN in zip(ctx.chunks, hs, strict=True):
            n, tok, w_n1 = r1 - r0, token_idx_R[r0:r1], w_R1[r0:r1]
            m = _padded_rows(n, pad)
            dy_mD = scratch.gather("dy", dy_TD, tok, m)
            # dy · W_out: d(out)/d(a) before the weight
            u_mF = _seg_mm(dy_mD, w_out_EDF, segs, None if onednn else scratch.get("u", n, Fh), transpose=False)
            dh_mN, aw_mF, dw_n = _act_grads(act, h_mN, u_mF, w_n1, scratch, need_w, need_wout)
            if need_w:
                dweights_R[r0:r1] = dw_n
            if need_wout:
                _accumulate_wgrad(dw_out, dy_mD, aw_mF, segs, touched_out, onednn)
            if need_win:
                _accumulate_wgrad(dw_in, dh_mN, scratch.gather("x", x_TD, tok, m), segs, touched_in, onednn)
            if need_x:
                dx_out = None if onednn else scratch.get("dy", n, x_TD.shape[1])  # dy is spent
                dx_mD = _seg_mm(dh_mN, w_in_END, segs, dx_out, transpose=False)
                row_ops.index_add_(dx_TD, tok, dx_mD[:n])
        for g, touched in ((dw_in, touched_in), (dw_out, touched_out)):
            if g is not None:  # experts that got no rows have zero gradient
                for e in (e for e, hit in enumerate(touched) if not hit):
                    g[e].zero_()
        dw = dweights_R.to(weights_R.dtype) if need_w else None
        return dx_TD, dw_in, dw_out, dw, None, None, None, None, None


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def _padded_rows(n: int, step: int) -> int:
    """n rows padded to a multiple of step; fewer than step rows stay as they are (at
    most step - 1 more shapes, and a decode step with 5-8 rows per expert would
    otherwise compute a full step of rows)."""
    return n if n < step else _round_up(n, step)


def _accumulate_wgrad(dw_E, left_nA, right_nB, segs, touched, onednn: bool):
    """dw_E[e] (A, B) += left[rows of e]ᵀ · right[rows of e] (all rows: padding is zero)."""
    one = len(segs) == 1
    for e, s, t in segs:
        left, right = (left_nA, right_nB) if one else (left_nA[s:t], right_nB[s:t])
        if onednn:
            prod = gemm.onednn_mm(left.t(), right)
            dw_E[e].add_(prod) if touched[e] else dw_E[e].copy_(prod)
        elif touched[e]:
            dw_E[e].addmm_(left.t(), right)
        else:
            torch.mm(left.t(), right, out=dw_E[e])
        touched[e] = True


def chunked_experts(x_TD: torch.Tensor, plan: DispatchPlan, counts: list[int], w_in_END: torch.Tensor,
                    w_out_EDF: torch.Tensor, act: Activation, path: CpuPath) -> torch.Tensor:
    return _ChunkedFFN.apply(x_TD, w_in_END, w_out_EDF, plan.weights_R, plan.token_idx_R, counts, act.name,
                             torch.is_grad_enabled(), path)


def forward_probe(products: str, dtype: torch.dtype, act: Activation, D: int, F: int, rows: int,
                  pad: int, chunk_rows: int) -> Callable[[], object]:
    """An inference forward of two experts of `rows` rows each (what ops/tune.py times)."""
    g = torch.Generator().manual_seed(0)
    x_TD = torch.randn(2 * rows, D, generator=g).to(dtype)
    w_in = (torch.randn(2, act.width_in(F), D, generator=g) * 0.02).to(dtype)
    w_out = (torch.randn(2, D, F, generator=g) * 0.02).to(dtype)
    tok_R, weights_R = torch.arange(2 * rows), torch.ones(2 * rows)
    path = CpuPath(kernel="chunked", products=products, pad=pad, chunk_rows=chunk_rows)
    return functools.partial(_ChunkedFFN.apply, x_TD, w_in, w_out, weights_R, tok_R, [rows, rows], act.name, False,
                             path)

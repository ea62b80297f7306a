"""The inference forward in rows on packed weights (ops/csrc/expert_bank_rows.cpp,
moe/experts/cpu/packed.py): the packed layout, the kernel against the column kernel (the
same bits) and the loop oracle (fp64), thread counts, pieces taken by another thread,
bad input, and when a layer packs (prepare_for_inference), uses and drops the copy."""

from __future__ import annotations

import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.inference import prepare_for_inference, restore
from moekit.moe.experts import ACTIVATIONS, loop
from moekit.moe.experts.cpu import packed
from moekit.moe.experts.cpu.path import ROWS_MAX_D
from moekit.moe.types import DispatchPlan
from moekit.ops import ext

pytestmark = pytest.mark.skipif(not ext.caps().avx512, reason="needs the C++ kernels built with AVX-512")
SWIGLU = ACTIVATIONS.get("swiglu")


def _case(name):
    """(x, w_in, w_out, tok, weights, counts) of each case the row forward has to get
    right: skewed loads with an empty expert; panels of every width (F/16 = 3: a gate/up
    panel of one vector each; D/16 = 5: output panels of 4 and 1); experts of 400+ rows
    (pieces of at most 192 rows); a model 4096 wide (pieces of 24 rows); too few tokens
    for a second thread; dropped slots; tokens with every slot dropped (their rows of y
    are zero)."""
    T, D, E, F, K = {"panels": (300, 80, 12, 48, 3), "long": (700, 32, 6, 32, 2), "wide": (300, 4096, 8, 16, 2),
                     "one_thread": (40, 32, 12, 32, 3)}.get(name, (300, 32, 12, 32, 3))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(T, D, generator=g)
    w_in = torch.randn(E, 2 * F, D, generator=g) * D**-0.5
    w_out = torch.randn(E, D, F, generator=g) * F**-0.5
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids[:60] = torch.arange(K)
    ids[ids == 5] = 6 % E  # expert 5 gets nothing (with E = 6 some tokens then take expert 0 twice)
    if name == "long":
        ids[:400] = torch.tensor([0, 1])
    flat = ids.flatten()
    order = torch.sort(flat, stable=True).indices
    if name == "drops":
        order = order[torch.arange(order.numel()) % 7 != 3]
    if name == "lost":
        order = order[(order // K < 100) | (order // K >= 110)]
    weights = torch.rand(T * K, generator=g)[order].contiguous()
    counts = torch.bincount(flat[order], minlength=E)
    return x, w_in, w_out, (order // K).contiguous(), weights, counts


CASES = ["skewed", "panels", "long", "wide", "one_thread", "drops", "lost"]


def _rows(x, w_in, w_out, tok, weights, counts, threads=None):
    """The row kernel's y and how many pieces a thread took from another."""
    y = torch.full_like(x, float("nan"))  # every row must be written
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        taken = ext.op("expert_bank_fwd_rows")(x, tok, weights, counts, packed.pack_in(w_in), packed.pack_out(w_out),
                                               y)
    finally:
        torch.set_num_threads(old)
    return y, taken


def _oracle(x, w_in, w_out, tok, weights, counts):
    plan = DispatchPlan(tok, tok, weights.double(), counts, counts, x.shape[0], top_k=0)
    return loop.loop_experts(x.double(), plan, w_in.double(), w_out.double(), SWIGLU)


def test_packed_layout():
    """Element by element: W_in's panels of gv gate column vectors then the same up
    columns (gv = 2, the last 1 when F/16 is odd), each (D, 32·gv) with k down the rows;
    W_out's panels of up to 4 output column vectors, each (F, 16·nv)."""
    E, F, D = 2, 48, 80
    w_in = torch.randn(E, 2 * F, D)
    w_out = torch.randn(E, D, F)
    p_in, p_out = packed.pack_in(w_in), packed.pack_out(w_out)
    assert p_in.shape == (E, 2 * F * D) and p_out.shape == (E, F * D)
    want_in = []
    for v0, gv in ((0, 2), (2, 1)):
        cols = [16 * v0 + c for c in range(16 * gv)] + [F + 16 * v0 + c for c in range(16 * gv)]
        want_in += [w_in[:, c, k] for k in range(D) for c in cols]
    assert torch.equal(p_in, torch.stack(want_in, dim=1))
    want_out = []
    for d0, nv in ((0, 4), (4, 1)):
        want_out += [w_out[:, 16 * d0 + c, k] for k in range(F) for c in range(16 * nv)]
    assert torch.equal(p_out, torch.stack(want_out, dim=1))


@pytest.mark.parametrize("case", CASES)
def test_row_forward_equals_the_column_forward(case):
    """The same bits as the column kernel (each output element one chain of FMAs over k
    in order, the same SwiGLU, each token's rows added in row order), and the loop oracle
    in fp64 within 1e-5 of the largest value."""
    x, w_in, w_out, tok, weights, counts = args = _case(case)
    y, _ = _rows(*args)
    y_cols = torch.empty_like(x)
    ext.op("expert_bank_fwd_cols")(x, tok, weights, counts, w_in, w_out, y_cols, [], [])
    assert torch.equal(y, y_cols)
    ref = _oracle(*args)
    assert (y.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    if case == "lost":
        assert y[100:110].abs().max() == 0


@pytest.mark.parametrize("case", ["skewed", "long", "wide", "drops"])
def test_row_forward_does_not_depend_on_the_thread_count(case):
    args = _case(case)
    y1, y2, y3 = (_rows(*args, threads=n)[0] for n in (1, 2, 3))
    assert torch.equal(y1, y2) and torch.equal(y1, y3)


def test_row_forward_pieces_taken_by_another_thread():
    """Every slot of the second half's tokens is dropped, so a second thread has nothing
    of its own and takes pieces from the first's back, leaving their rows for the owner:
    the outputs must equal one thread's bit for bit (the kernel says how many it took)."""
    T, D, E, F = 8000, 128, 8, 128  # ~3 ms of work per call, so that the second thread is up before it ends
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, D, generator=g)
    w_in, w_out = torch.randn(E, 2 * F, D, generator=g) * 0.1, torch.randn(E, D, F, generator=g) * 0.1
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T // 2)]).flatten()
    order = torch.sort(ids, stable=True).indices
    args = (x, w_in, w_out, (order // 2).contiguous(), torch.rand(T, generator=g)[order].contiguous(),
            torch.bincount(ids, minlength=E))
    y1, _ = _rows(*args, threads=1)
    taken = []
    for _ in range(30):  # on a busy machine the second thread may start late
        y2, n = _rows(*args, threads=2)
        taken.append(n)
        assert torch.equal(y1, y2)
        if sum(taken[1:]) > 3:
            break
    # not only the first call, whose threads start late: a thief that found its victim's
    # list not yet built used to give up, on every call but the first
    assert sum(taken[1:]) > 0, f"no call after the first took a piece: {taken}"
    ref = _oracle(*args)
    assert (y1.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    assert y1[T // 2:].abs().max() == 0


def test_row_kernel_rejects_bad_input():
    x, w_in, w_out, tok, weights, counts = _case("skewed")
    p_in, p_out = packed.pack_in(w_in), packed.pack_out(w_out)
    fwd = ext.op("expert_bank_fwd_rows")
    y = torch.empty_like(x)
    fwd(x, tok, weights, counts, p_in, p_out, y)  # fine
    with pytest.raises(RuntimeError, match="packed weights"):
        fwd(x, tok, weights, counts, p_in[:, 1:].contiguous(), p_out, y)
    with pytest.raises(RuntimeError, match="packed weights"):
        fwd(x, tok, weights, counts, p_in.view(12, 64, 32), p_out, y)
    with pytest.raises(RuntimeError, match="multiples of 16, got D=32 F=24"):
        fwd(x, tok, weights, counts, p_in[:, :48 * 32].contiguous(), p_out[:, :24 * 32].contiguous(), y)
    with pytest.raises(RuntimeError, match=f"add up to {tok.numel()} rows, not {tok.numel() - 1}"):
        fwd(x, tok[1:].contiguous(), weights[1:].contiguous(), counts, p_in, p_out, y)
    with pytest.raises(RuntimeError, match="token index 300 out of range"):
        fwd(x, torch.full_like(tok, 300), weights, counts, p_in, p_out, y)
    with pytest.raises(RuntimeError, match="y must be"):
        fwd(x, tok, weights, counts, p_in, p_out, y[:5])


def _layer(d_model=32, d_ff=16):
    cfg = MoEConfig(d_model=d_model, num_experts=16, top_k=4, d_ff=d_ff, num_shared_experts=1)
    torch.manual_seed(0)
    return MoELayer(cfg), torch.randn(4, 50, d_model)


@pytest.mark.parametrize("micro", [True, False])
def test_a_layer_runs_in_rows_once_prepared(micro):
    """Before prepare_for_inference an inference forward runs as it would without packing
    (in columns for experts that fit the micro-kernel, else whole experts per thread);
    after it, in rows on the packed copy (the column kernel's bits). A change of the
    weights in place (an optimizer step) makes the copy stale: the next forward runs on
    the weights as they lie and drops it. A training forward drops it too, and restore()."""
    layer, x = _layer() if micro else _layer(512, 272)  # 2F x D floats: 1.1 MiB, past the micro-kernel
    first = "columns" if micro else "whole"

    def infer():
        with torch.no_grad():
            y = layer(x).y
        return y, layer.experts.cpu_state.last_path.kernel

    def same(a, b):  # whole experts sum in another order: equal to rounding
        return torch.equal(a, b) if micro else torch.allclose(a, b, atol=1e-6, rtol=1e-5)

    y1, p1 = infer()
    assert p1 == first
    assert prepare_for_inference(layer).packed == ["experts"]
    (y2, p2), (y3, p3) = infer(), infer()
    assert (p2, p3) == ("rows", "rows")
    assert same(y1, y2) and torch.equal(y2, y3)
    with torch.no_grad():
        layer.experts.w_in.mul_(1.5)
    y4, p4 = infer()
    assert p4 == first and layer.experts.cpu_state.packed is None and not torch.allclose(y4, y1)
    prepare_for_inference(layer)
    assert infer()[1] == "rows"
    layer(x).y.sum().backward()  # a training forward
    assert layer.experts.cpu_state.packed is None
    prepare_for_inference(layer)
    restore(layer)
    assert layer.experts.cpu_state.packed is None


def test_a_model_wider_than_rows_max_d_is_not_packed():
    cfg = MoEConfig(d_model=ROWS_MAX_D + 16, num_experts=4, top_k=2, d_ff=16)
    assert prepare_for_inference(MoELayer(cfg)).packed == []


def test_a_packed_copy_matches_only_its_weights():
    w_in, w_out = torch.randn(4, 64, 32), torch.randn(4, 32, 32)
    p = packed.pack(w_in, w_out)
    assert torch.equal(p.p_in, packed.pack_in(w_in)) and torch.equal(p.p_out, packed.pack_out(w_out))
    assert p.matches(w_in, w_out)
    w_out.add_(1.0)
    assert not p.matches(w_in, w_out)
    assert not p.matches(w_in.clone(), w_out)

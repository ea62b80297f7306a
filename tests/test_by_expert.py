"""Whole experts per thread (moe/experts/by_expert.py, ops/csrc/expert_bank.cpp) against
the loop oracle and grouped.py's chunk loop: outputs and every gradient in fp32, with
chunks forced small so that experts span chunks (the first-write / add path of the
weight gradients), empty experts, skewed loads, padding rows, and each subset of
needed gradients. The kernel serves CPU float32 SwiGLU only; fp64 parity of the layer
stays with grouped.py (tests/test_grouped_chunks.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.moe.experts import ACTIVATIONS, by_expert, grouped, loop
from moekit.moe.types import DispatchPlan
from moekit.ops import ext, gemm

pytestmark = pytest.mark.skipif(not (ext.available() and gemm.onednn_available()),
                                reason="needs the C++ kernels and oneDNN")
SWIGLU = ACTIVATIONS.get("swiglu")


def _problem(T=300, D=32, E=12, F=24, K=3, seed=0, empty=(5,)):
    """Random experts, a skewed routing (tokens 0..59 all to experts 0..K-1) and some
    experts with no rows; returns the leaf tensors and a DispatchPlan over them."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    w_in = torch.randn(E, 2 * F, D, generator=g) * 0.2
    w_out = torch.randn(E, D, F, generator=g) * 0.2
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids[:60] = torch.arange(K)
    for e in empty:
        ids[ids == e] = (e + 1) % E
    weights = torch.rand(T, K, generator=g)
    return x, w_in, w_out, ids, weights


# how the bank's rows become y: summed per token from their slots (the plan gives top_k),
# the same with some slots dropped (their buffer rows must read as zero), or
# scatter-added chunk by chunk (a plan without top_k)
COMBINES = ["slots", "drops", "scatter"]


def _plan(ids, weights_TK, combine="slots"):
    T, K = ids.shape
    flat = ids.flatten()
    order = torch.sort(flat, stable=True).indices
    if combine == "drops":  # every 7th slot dropped, as a capacity would
        order = order[torch.arange(order.numel()) % 7 != 3]
    counts = torch.bincount(flat[order], minlength=int(ids.max()) + 1)
    return DispatchPlan(order // K, order, weights_TK.flatten()[order], counts, counts, T,
                        top_k=0 if combine == "scatter" else K)


def _run(fn, tensors, ids, need, combine="slots"):
    """fn's output and the gradients of the tensors whose names are in need."""
    names = ("x", "w_in", "w_out", "weights")
    leaves = [t.clone().requires_grad_(n in need) for n, t in zip(names, tensors, strict=True)]
    x, w_in, w_out, weights = leaves
    y = fn(x, _plan(ids, weights, combine), w_in, w_out, SWIGLU)
    probe = torch.linspace(-1, 1, y.numel()).view_as(y)
    if need:
        (y * probe).sum().backward()
    return y.detach(), {n: t.grad for n, t in zip(names, leaves, strict=True) if n in need}


# the products' kernel (ops/gemm.py: bank_micro_kernel): oneDNN's brgemm micro-kernel, or
# its matmul with every expert's rows padded
KERNELS = ["micro", "matmul"]


def _kernel(monkeypatch, kernel):
    monkeypatch.setattr(gemm, "bank_micro_kernel", lambda d, n_in: kernel == "micro")


def _force_small_chunks(monkeypatch, rows=64):
    monkeypatch.setattr(by_expert, "MIN_CHUNK_ROWS", rows)
    monkeypatch.setattr(by_expert, "CHUNK_BYTES", 1)
    monkeypatch.setattr(by_expert, "MIN_EXPERTS_PER_THREAD", 0)


def _spy(monkeypatch):
    calls = []
    real = by_expert.by_expert_experts

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(by_expert, "by_expert_experts", spy)
    return calls


NEEDS = [("x", "w_in", "w_out", "weights"), ("x",), ("w_in", "w_out"), ("weights",), ()]


@pytest.mark.parametrize("need", NEEDS, ids=lambda n: "+".join(n) or "no_grad")
@pytest.mark.parametrize("rows", [64, 10_000])
@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_matches_the_loop_oracle(monkeypatch, need, rows, combine, kernel):
    _force_small_chunks(monkeypatch, rows)
    _kernel(monkeypatch, kernel)
    calls = _spy(monkeypatch)
    tensors = _problem()
    ids = tensors[3]
    x, w_in, w_out, _, weights = tensors
    fast = _run(grouped.grouped_experts, (x, w_in, w_out, weights), ids, need, combine)
    assert calls, "the by-expert path must have run"
    ref = _run(loop.loop_experts, (x, w_in, w_out, weights), ids, need, combine)
    torch.testing.assert_close(fast[0], ref[0], atol=1e-5, rtol=1e-5)
    assert fast[1].keys() == ref[1].keys() == set(need)
    for n in need:
        torch.testing.assert_close(fast[1][n], ref[1][n], atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    if "w_in" in need:  # experts without rows get exactly zero gradient
        assert fast[1]["w_in"][5].abs().max() == 0 and fast[1]["w_out"][5].abs().max() == 0


@pytest.mark.parametrize("kernel", KERNELS)
def test_long_experts_match_the_loop_oracle(monkeypatch, kernel):
    """Experts of 400+ rows in one chunk: several row blocks in every product and, in the
    weight gradients, several blocks of the reduction over rows (expert_bank.cpp:
    MICRO_ROWS, MICRO_DEPTH). Sums over 600 rows reach ~60, so the oracle runs in fp64 and
    every result must be within 1e-5 of its tensor's largest value (the fp32 loop itself
    is ~5e-7 off)."""
    _force_small_chunks(monkeypatch, 10_000)
    _kernel(monkeypatch, kernel)
    x, w_in, w_out, ids, weights = _problem(T=700, E=6, K=2)
    ids[:400] = torch.tensor([0, 1])
    fast = _run(grouped.grouped_experts, (x, w_in, w_out, weights), ids, NEEDS[0])
    ref = _run(loop.loop_experts, tuple(t.double() for t in (x, w_in, w_out, weights)), ids, NEEDS[0])
    for name, got, want in [("y", fast[0], ref[0])] + [(n, fast[1][n], ref[1][n]) for n in NEEDS[0]]:
        err = (got.double() - want).abs().max().item()
        assert err <= 1e-5 * want.abs().max().item(), (name, err)
    assert fast[1]["w_in"][5].abs().max() == 0, "expert 5 has no rows (and counts stop at expert 4)"


@pytest.mark.parametrize("combine", ["slots", "drops"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_streamed_slot_writes_change_nothing(monkeypatch, combine, kernel):
    """Slot buffers past STREAM_MIN_BYTES are written with non-temporal stores
    (expert_bank.cpp: scatter_rows): outputs and gradients equal the plain stores' bit for
    bit, and the kernels really got stream=True."""
    _force_small_chunks(monkeypatch, 64)
    _kernel(monkeypatch, kernel)
    tensors = _problem()
    x, w_in, w_out, ids, weights = tensors
    flags = []
    real_op = ext.op

    def spy_op(name):
        fn = real_op(name)
        return (lambda *a: flags.append((name, a[-1])) or fn(*a)) if name.startswith("expert_bank") else fn

    monkeypatch.setattr(ext, "op", spy_op)
    out = {}
    for limit in (2**62, 0):
        monkeypatch.setattr(by_expert, "STREAM_MIN_BYTES", limit)
        flags.clear()
        out[limit] = _run(grouped.grouped_experts, (x, w_in, w_out, weights), ids, NEEDS[0], combine)
        # micro-kernel experts: the forward runs in columns, without slots (its last
        # argument is not a stream flag); only the backward's dx slots remain
        cols = kernel == "micro" and by_expert._columns_built()
        names = {"expert_bank_bwd"} | ({"expert_bank_fwd_cols"} if cols else {"expert_bank_fwd"})
        assert {n for n, _ in flags} == names
        assert {f for n, f in flags if n != "expert_bank_fwd_cols"} == {limit == 0}
    (y_a, g_a), (y_b, g_b) = out.values()
    assert torch.equal(y_a, y_b)
    for n in NEEDS[0]:
        assert torch.equal(g_a[n], g_b[n]), n


@pytest.mark.parametrize("combine", COMBINES)
def test_one_kernel_call_over_all_chunks(monkeypatch, combine):
    """With a slot buffer the forward and the backward each make one kernel call over
    every chunk (no join of the threads between chunks); the chunk-by-chunk scatter makes
    one per chunk. Small chunks split experts, so the backward's per-expert tasks hold
    several segments, and the oracle test above checks their results. (Micro-kernel
    experts run the forward in columns: one call whatever the chunks.)"""
    _force_small_chunks(monkeypatch, 64)
    _kernel(monkeypatch, "matmul")
    names = []
    real_op = ext.op
    monkeypatch.setattr(ext, "op", lambda name: names.append(name) or real_op(name))
    x, w_in, w_out, ids, weights = _problem()
    _run(grouped.grouped_experts, (x, w_in, w_out, weights), ids, NEEDS[0], combine)
    chunks = len(by_expert.plan_segments(torch.bincount(ids.flatten()).tolist(), 64))
    calls = 1 if combine != "scatter" else chunks
    assert chunks > 10
    assert names.count("expert_bank_fwd") == calls and names.count("expert_bank_bwd") == calls


def test_small_chunks_split_experts(monkeypatch):
    """The chunk plan really splits experts, and marks only their first segment first-write."""
    chunks = by_expert.plan_segments([70, 0, 5, 130], 64)
    seen, firsts = [], {}
    for r0, r1, seg in chunks:
        assert 0 < r1 - r0 <= 64 and seg[0, 1] == 0 and seg[-1, 2] == r1 - r0
        assert len(set(seg[:, 0].tolist())) == len(seg), "one segment per expert in a chunk"
        for e, s, t, first in seg.tolist():
            seen += [e] * (t - s)
            firsts.setdefault(e, []).append(first)
    assert seen == [0] * 70 + [2] * 5 + [3] * 130
    assert firsts == {0: [1, 0], 2: [1], 3: [1, 0, 0]}


def _small_layer():
    """A MoELayer with a shared expert and the balance losses, and an input for it."""
    cfg = MoEConfig(d_model=32, num_experts=16, top_k=4, d_ff=16, num_shared_experts=1)
    torch.manual_seed(0)
    return MoELayer(cfg), torch.randn(4, 50, 32)


def _train_step(layer, x):
    """(y, dx, the parameters' gradients) of one forward and backward of the layer."""
    layer.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    out = layer(xi)
    (out.y.square().sum() + out.aux_loss).backward()
    return out.y.detach(), xi.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


def test_matches_the_chunk_loop_in_a_layer(monkeypatch):
    """Through MoELayer with a shared expert and the balance losses, against the same
    layer with the by-expert path switched off (grouped.py's chunk loop)."""
    calls = _spy(monkeypatch)
    layer, x = _small_layer()
    results = []
    for on in (True, False):
        monkeypatch.setattr(by_expert, "ENABLED", on)
        results.append(_train_step(layer, x))
    assert len(calls) == 1
    (y_a, gx_a, g_a), (y_b, gx_b, g_b) = results
    torch.testing.assert_close(y_a, y_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx_a, gx_b, atol=1e-5, rtol=1e-5)
    for n in g_a:
        torch.testing.assert_close(g_a[n], g_b[n], atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("path", ["columns", "by_expert", "chunk_loop"])
def test_an_inference_forward_saves_nothing(monkeypatch, path):
    """Under no_grad the experts' Function keeps no pre-activations for a backward that
    cannot come, although its weights require grad (autograd's needs_input_grad still
    says they do there, so the Function is told the grad mode)."""
    _force_small_chunks(monkeypatch, 64)
    _kernel(monkeypatch, "micro" if path == "columns" else "matmul")
    monkeypatch.setattr(by_expert, "ENABLED", path != "chunk_loop")
    x, w_in, w_out, ids, weights = _problem()
    w_in, w_out = w_in.requires_grad_(), w_out.requires_grad_()
    saved = []
    real = torch.autograd.function.FunctionCtx.save_for_backward
    monkeypatch.setattr(torch.autograd.function.FunctionCtx, "save_for_backward",
                        lambda ctx, *t: saved.append(len(t)) or real(ctx, *t))
    for grad_on in (True, False):
        with torch.set_grad_enabled(grad_on):
            grouped.grouped_experts(x, _plan(ids, weights), w_in, w_out, SWIGLU)
    base = 5 if path == "chunk_loop" else 6  # the inputs it keeps, before any block of h
    assert len(saved) == 2 and saved[0] > base and saved[1] == base, saved


@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_results_do_not_depend_on_the_thread_count(monkeypatch, combine, kernel):
    """Each expert's products run on one thread in a fixed order, and each token's rows
    are summed in a fixed order: 1 and 2 threads give bit-identical outputs and
    gradients (what exact resume relies on)."""
    _force_small_chunks(monkeypatch, 10_000)
    _kernel(monkeypatch, kernel)
    tensors = _problem(T=400, E=16)
    x, w_in, w_out, ids, weights = tensors
    old = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append(_run(grouped.grouped_experts, (x, w_in, w_out, weights), ids, NEEDS[0], combine))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(out[0][0], out[1][0])
    for n in NEEDS[0]:
        assert torch.equal(out[0][1][n], out[1][1][n]), n


@pytest.mark.parametrize("case,expect", [
    ("fp64", False), ("gelu", False), ("few_experts", False), ("ok", True), ("off", False),
    ("strided", False)])
def test_takes_only_what_it_serves(monkeypatch, case, expect):
    threads = torch.get_num_threads()
    x = torch.randn(8, 16, dtype=torch.float64 if case == "fp64" else torch.float32)
    E = 1 if case == "few_experts" else 8 * threads
    w_in, w_out = torch.randn(E, 16, 16, dtype=x.dtype), torch.randn(E, 16, 8, dtype=x.dtype)
    counts = [4096] * E if case == "few_experts" else [3] * E
    if case == "off":
        monkeypatch.setattr(by_expert, "ENABLED", False)
    if case == "strided":  # e.g. a transposed view of loaded weights: left to the chunk loop
        w_in = torch.randn(E, 16, 16).transpose(1, 2)
    act = ACTIVATIONS.get("gelu" if case == "gelu" else "swiglu")
    assert by_expert.takes(x, counts, w_in, w_out, act) is expect


def test_kernel_rejects_bad_segments_and_tokens():
    x, w_in, w_out, ids, weights = _problem(T=10, E=4, K=1, empty=())
    out = torch.empty(10, 32)
    tok, w = torch.arange(10), torch.ones(10)
    fwd, bwd = ext.op("expert_bank_fwd"), ext.op("expert_bank_bwd")
    seg = torch.tensor([[0, 0, 10, 1]])
    with pytest.raises(RuntimeError, match="segment 0"):
        fwd(x, tok, w, torch.tensor([[9, 0, 10, 1]]), w_in, w_out, out, tok, [], [], 32, True, False)
    with pytest.raises(RuntimeError, match="token index 10 out of range"):
        fwd(x, torch.full((10,), 10), w, seg, w_in, w_out, out, tok, [], [], 32, True, False)
    with pytest.raises(RuntimeError, match="destination row 10 out of range"):
        fwd(x, tok, w, seg, w_in, w_out, out, tok + 1, [], [], 32, True, False)
    with pytest.raises(RuntimeError, match="x must be"):
        fwd(x.double(), tok, w, seg, w_in, w_out, out, tok, [], [], 32, True, False)
    # the saved pre-activations: blocks that do not cover a segment, or a wrong width
    two = torch.tensor([[0, 0, 4, 1], [1, 4, 10, 1]])
    with pytest.raises(RuntimeError, match="not inside one block of h"):
        fwd(x, tok, w, two, w_in, w_out, out, tok, [torch.empty(5, 48), torch.empty(5, 48)], [0, 5], 32, True, False)
    with pytest.raises(RuntimeError, match="each block of h"):
        fwd(x, tok, w, two, w_in, w_out, out, tok, [torch.empty(10, 47)], [0], 32, True, False)
    with pytest.raises(RuntimeError, match="row starts of h must ascend"):
        fwd(x, tok, w, two, w_in, w_out, out, tok, [torch.empty(6, 48), torch.empty(4, 48)], [4, 0], 32, True, False)
    with pytest.raises(RuntimeError, match="2 blocks of h but 1 row starts"):
        fwd(x, tok, w, two, w_in, w_out, out, tok, [torch.empty(4, 48), torch.empty(6, 48)], [0], 32, True, False)
    # the backward hands an expert's segments to one thread: they must follow each other
    apart = torch.tensor([[0, 0, 3, 1], [1, 3, 6, 1], [0, 6, 10, 0]])
    e = torch.empty(0)
    with pytest.raises(RuntimeError, match="segments must follow each other"):
        bwd(x, tok, w, apart, w_in, w_out, [torch.empty(10, 48)], [0], torch.randn(10, 32), e, e, e,
            torch.empty_like(w_in), e, 32, True, False)


# The forward of micro-kernel experts with threads owning tokens, in columns
# (ops/csrc/expert_bank_cols.cpp): what it must equal, and where it runs. The kernel needs
# an AVX-512 build; elsewhere by_expert.py never calls it.
needs_columns = pytest.mark.skipif(not by_expert._columns_built(), reason="the column kernel needs AVX-512")


def _column_calls(monkeypatch):
    names = []
    real_op = ext.op
    monkeypatch.setattr(ext, "op", lambda name: names.append(name) or real_op(name))
    return names


def _columns_case(case):
    """(tensors, plan) of each case the column forward has to get right."""
    T, D, E, K = {"long": (700, 32, 6, 2), "one_thread": (40, 32, 12, 3), "narrow": (300, 24, 12, 3)}.get(
        case, (300, 32, 12, 3))
    x, w_in, w_out, ids, weights = _problem(T=T, D=D, E=E, K=K)
    if case == "long":  # 400+ rows of experts 0 and 1: a thread's rows in several pieces
        ids[:400] = torch.tensor([0, 1])
    if case == "repeats":  # a token twice in one expert (rows next to each other)
        ids[200:220, 1] = ids[200:220, 0]
    plan = _plan(ids, weights, "drops" if case == "drops" else "slots")
    if case == "lost":  # every slot of tokens 100..109 dropped: their rows of y are zero
        keep = (plan.token_idx_R < 100) | (plan.token_idx_R >= 110)
        counts = torch.bincount(ids.flatten()[plan.slot_idx_R[keep]], minlength=E)
        plan = DispatchPlan(plan.token_idx_R[keep], plan.slot_idx_R[keep], plan.weights_R[keep], counts, counts, T,
                            top_k=K)
    return (x, w_in, w_out), plan


@needs_columns
@pytest.mark.parametrize("case", ["skewed", "long", "one_thread", "drops", "lost", "repeats", "narrow"])
def test_column_forward_matches_the_loop_oracle(monkeypatch, case):
    """no_grad outputs against the loop oracle in fp64 (within 1e-5 of the largest value):
    skewed loads with empty experts, experts of 400+ rows (pieces of at most 192 columns),
    too few tokens for a second thread, dropped slots, tokens with every slot dropped (zero
    rows), a token twice in one expert. A width that is not a multiple of 16 ("narrow")
    runs the whole-experts forward instead."""
    _kernel(monkeypatch, "micro")
    (x, w_in, w_out), plan = _columns_case(case)
    names = _column_calls(monkeypatch)
    with torch.no_grad():
        y = grouped.grouped_experts(x, plan, w_in, w_out, SWIGLU)
    assert ("expert_bank_fwd_cols" in names) == (case != "narrow"), names
    assert "expert_bank_fwd" not in names or case == "narrow"
    ref = loop.loop_experts(x.double(), dataclasses.replace(plan, weights_R=plan.weights_R.double()),
                            w_in.double(), w_out.double(), SWIGLU)
    err = (y.double() - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item(), err
    if case == "lost":
        assert y[100:110].abs().max() == 0


@pytest.mark.parametrize("case", ["skewed", "long", "drops"])
def test_column_forward_does_not_depend_on_the_thread_count(monkeypatch, case):
    """Each output element is one chain of FMAs, and each token's rows are added in row
    order whichever thread owns it: 1, 2 and 3 threads give the same bits."""
    _kernel(monkeypatch, "micro")
    (x, w_in, w_out), plan = _columns_case(case)
    old = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with torch.no_grad():
                out.append(grouped.grouped_experts(x, plan, w_in, w_out, SWIGLU))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


@needs_columns
def test_column_forward_matches_whole_experts_in_a_layer(monkeypatch):
    """Through MoELayer with a shared expert and the balance losses: the column forward
    (inference, and training with its saved pre-activations feeding the backward) against
    the same layer with it switched off (whole experts per thread, summed slots)."""
    _kernel(monkeypatch, "micro")
    names = _column_calls(monkeypatch)
    layer, x = _small_layer()
    results = []
    for on in (True, False):
        monkeypatch.setattr(by_expert, "COLUMNS", on)
        names.clear()
        with torch.no_grad():
            y_inf = layer(x).y
        step = _train_step(layer, x)
        fwd = "expert_bank_fwd_cols" if on else "expert_bank_fwd"
        assert names.count(fwd) == 2 and names.count("expert_bank_bwd") == 1, names
        results.append((y_inf, *step))
    (yi_a, y_a, gx_a, g_a), (yi_b, y_b, gx_b, g_b) = results
    assert torch.equal(yi_a, y_a), "with or without grad, the column forward gives the same bits"
    for a, b in ((y_a, y_b), (yi_a, yi_b), (gx_a, gx_b)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for n in g_a:
        torch.testing.assert_close(g_a[n], g_b[n], atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


@needs_columns
def test_column_forward_pieces_taken_by_another_thread(monkeypatch):
    """A thread out of work takes pieces from the back of another thread's tokens and
    leaves their outputs for the owner, which adds them in order. Here every slot of the
    second half's tokens is dropped, so a second thread has nothing of its own and takes
    pieces: outputs and saved pre-activations must equal one thread's bit for bit (the
    kernel says how many pieces it took), and the oracle's values."""
    _kernel(monkeypatch, "micro")
    T = 8000  # ~1 ms of work per call, so that the second thread is up before it ends
    x, w_in, w_out, ids, weights = _problem(T=T, D=64, E=8, F=64, K=2, empty=())
    plan = _plan(ids, weights)
    keep = plan.token_idx_R < T // 2
    counts = torch.bincount(ids.flatten()[plan.slot_idx_R[keep]], minlength=8)
    args = (x, plan.token_idx_R[keep].contiguous(), plan.weights_R[keep].contiguous(), counts, w_in, w_out)
    fwd = ext.op("expert_bank_fwd_cols")
    rows = int(keep.sum())

    def run(threads):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            y, h = torch.empty_like(x), torch.empty(rows, w_in.shape[1])
            return fwd(*args, y, [h], [0]), y, h
        finally:
            torch.set_num_threads(old)

    _, y1, h1 = run(1)
    taken = 0
    for _ in range(20):  # on a busy machine the second thread may start late
        n, y2, h2 = run(2)
        taken += n
        assert torch.equal(y1, y2) and torch.equal(h1, h2)
        if taken > 3:
            break
    assert taken > 0, "the idle thread never took a piece"
    kept = dataclasses.replace(plan, token_idx_R=args[1], slot_idx_R=plan.slot_idx_R[keep], weights_R=args[2],
                               counts_E=counts, requested_E=counts)
    ref = loop.loop_experts(x.double(), dataclasses.replace(kept, weights_R=kept.weights_R.double()),
                            w_in.double(), w_out.double(), SWIGLU)
    assert (y1.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    assert y1[T // 2:].abs().max() == 0


@needs_columns
def test_column_kernel_rejects_bad_input():
    x, w_in, w_out, ids, weights = _problem(T=10, E=4, K=1, empty=())
    tok, w, y = torch.arange(10), torch.ones(10), torch.empty(10, 32)
    fwd = ext.op("expert_bank_fwd_cols")
    counts = torch.tensor([3, 3, 4])
    fwd(x, tok, w, counts, w_in, w_out, y, [], [])  # fine
    with pytest.raises(RuntimeError, match="multiple of 16, got 24"):
        fwd(x[:, :24].contiguous(), tok, w, counts, w_in[:, :, :24].contiguous(), w_out[:, :24].contiguous(),
            y[:, :24].contiguous(), [], [])
    with pytest.raises(RuntimeError, match="add up to 9 rows, not 10"):
        fwd(x, tok, w, torch.tensor([3, 3, 3]), w_in, w_out, y, [], [])
    with pytest.raises(RuntimeError, match="expert 1 has a negative count -3"):
        fwd(x, tok, w, torch.tensor([3, -3, 10]), w_in, w_out, y, [], [])
    with pytest.raises(RuntimeError, match="at most 4 entries"):
        fwd(x, tok, w, torch.tensor([2, 2, 2, 2, 2]), w_in, w_out, y, [], [])
    with pytest.raises(RuntimeError, match="token index 10 out of range"):
        fwd(x, torch.full((10,), 10), w, counts, w_in, w_out, y, [], [])
    with pytest.raises(RuntimeError, match="y must be"):
        fwd(x, tok, w, counts, w_in, w_out, y[:5], [], [])
    with pytest.raises(RuntimeError, match="2 blocks of h but 1 row starts"):
        fwd(x, tok, w, counts, w_in, w_out, y, [torch.empty(4, 48), torch.empty(6, 48)], [0])
    with pytest.raises(RuntimeError, match="covering the rows in order"):
        fwd(x, tok, w, counts, w_in, w_out, y, [torch.empty(4, 48), torch.empty(6, 48)], [0, 5])
    with pytest.raises(RuntimeError, match="covering the rows in order"):
        fwd(x, tok, w, counts, w_in, w_out, y, [torch.empty(10, 47)], [0])
    with pytest.raises(RuntimeError, match="cover all 10 rows"):
        fwd(x, tok, w, counts, w_in, w_out, y, [torch.empty(4, 48), torch.empty(5, 48)], [0, 4])

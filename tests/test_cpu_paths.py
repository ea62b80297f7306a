"""The CPU wing of the expert bank (moe/experts/cpu/): every path, reached by value, against
the loop oracle; the table of which path each call takes; the kernels' guards.

Paths are passed as CpuPath values (never by patching module globals): outputs and
every gradient in fp32 with chunks forced small (experts span chunks: the first-write /
add path of the weight gradients), empty experts, skewed loads, dropped slots, and each
subset of needed gradients.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moekit import MoEConfig, MoELayer, settings
from moekit.moe.experts import ACTIVATIONS
from moekit.moe.experts.cpu import CpuPath, call_of, choose, cpu_experts
from moekit.moe.experts.cpu import path as cpu_path
from moekit.moe.experts.cpu.whole import _calls, plan_segments
from moekit.moe.experts.loop import loop_experts
from moekit.moe.types import DispatchPlan
from moekit.ops import expert_bank as bank_ops
from moekit.ops import ext, gemm

SWIGLU = ACTIVATIONS.get("swiglu")
kernels = pytest.mark.skipif(not ext.available(), reason="needs the C++ kernels")
avx512 = pytest.mark.skipif(not ext.caps().avx512, reason="needs the C++ kernels built with AVX-512")


def _engines() -> list[str]:
    out = ["micro", "blas"]
    if ext.available() and bank_ops.matmul_works():
        out.append("matmul")
    return out


def paths(rows: int) -> list[CpuPath]:
    """Every path this build can run on a training call, chunks of `rows` rows."""
    out = [CpuPath(kernel="chunked", products="torch", chunk_rows=rows)]
    if gemm.onednn_takes(torch.empty(0)):
        out.append(CpuPath(kernel="chunked", products="onednn", chunk_rows=rows, pad=gemm.SHAPE_STEP))
    if ext.available():
        out += [CpuPath(kernel="whole", products=e, combine="slots", chunk_rows=rows, pad=gemm.SHAPE_STEP)
                for e in _engines()]
    if ext.caps().avx512:
        out.append(CpuPath(kernel="columns", products="micro", combine="slots", chunk_rows=rows,
                           pad=gemm.SHAPE_STEP))
    return out


def _problem(T=300, D=32, E=12, F=24, K=3, seed=0, empty=(5,)):
    """Random experts, a skewed routing (tokens 0..59 all to experts 0..K-1) and some
    experts with no rows."""
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


# how rows become y: summed per token from their slots (the plan gives top_k), the same
# with some slots dropped (their buffer rows must read as zero), or scatter-added
# chunk by chunk (a plan without top_k)
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
    y = fn(x, _plan(ids, weights, combine), w_in, w_out)
    probe = torch.linspace(-1, 1, y.numel()).view_as(y)
    if need:
        (y * probe).sum().backward()
    return y.detach(), {n: t.grad for n, t in zip(names, leaves, strict=True) if n in need}


def _on(path):
    return lambda x, plan, w_in, w_out: cpu_experts(x, plan, w_in, w_out, SWIGLU, path=path)


def _oracle(x, plan, w_in, w_out):
    return loop_experts(x, plan, w_in, w_out, SWIGLU)


NEEDS = [("x", "w_in", "w_out", "weights"), ("x",), ("w_in", "w_out"), ("weights",), ()]


@pytest.mark.parametrize("need", NEEDS, ids=lambda n: "+".join(n) or "no_grad")
@pytest.mark.parametrize("rows", [64, 10_000])
@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("path", paths(1), ids=lambda p: f"{p.kernel}-{p.products}")
def test_every_path_matches_the_loop_oracle(path, combine, rows, need):
    path = dataclasses.replace(path, chunk_rows=rows, combine="scatter" if combine == "scatter" else path.combine)
    tensors = _problem()
    x, w_in, w_out, ids, weights = tensors
    fast = _run(_on(path), (x, w_in, w_out, weights), ids, need, combine)
    ref = _run(_oracle, (x, w_in, w_out, weights), ids, need, combine)
    torch.testing.assert_close(fast[0], ref[0], atol=1e-5, rtol=1e-5)
    assert fast[1].keys() == ref[1].keys() == set(need)
    for n in need:
        torch.testing.assert_close(fast[1][n], ref[1][n], atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    if "w_in" in need:  # experts without rows get exactly zero gradient
        assert fast[1]["w_in"][5].abs().max() == 0 and fast[1]["w_out"][5].abs().max() == 0


@pytest.mark.parametrize("path", paths(10_000), ids=lambda p: f"{p.kernel}-{p.products}")
def test_long_experts_match_the_loop_oracle(path):
    """Experts of 400+ rows in one chunk: several row blocks in every product and several
    blocks of the weight gradients' reduction. Sums over 600 rows reach ~60, so the oracle
    runs in fp64 and every result must be within 1e-5 of its tensor's largest value."""
    x, w_in, w_out, ids, weights = _problem(T=700, E=6, K=2)
    ids[:400] = torch.tensor([0, 1])
    fast = _run(_on(path), (x, w_in, w_out, weights), ids, NEEDS[0])
    ref = _run(_oracle, tuple(t.double() for t in (x, w_in, w_out, weights)), ids, NEEDS[0])
    for name, got, want in [("y", fast[0], ref[0])] + [(n, fast[1][n], ref[1][n]) for n in NEEDS[0]]:
        err = (got.double() - want).abs().max().item()
        assert err <= 1e-5 * want.abs().max().item(), (name, err)
    assert fast[1]["w_in"][5].abs().max() == 0, "expert 5 has no rows (and counts stop at expert 4)"


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("products", ["torch", "onednn"])
def test_the_chunk_loop_takes_other_dtypes(products, dtype):
    """fp64 exactly (1e-10 of the oracle), bf16 within its rounding; oneDNN only where it
    takes the dtype (bf16 needs oneDNN's bf16 kernels: not on AVX2-only CPUs)."""
    if products == "onednn" and not gemm.onednn_takes(torch.empty(0, dtype=dtype)):
        pytest.skip(f"oneDNN takes no {dtype} products here")
    path = CpuPath(kernel="chunked", products=products, chunk_rows=64, pad=32 if products == "onednn" else 1)
    x, w_in, w_out = (t.to(dtype) for t in _problem()[:3])
    ids, weights = _problem()[3], _problem()[4].to(dtype)
    fast = _run(_on(path), (x, w_in, w_out, weights), ids, NEEDS[0])
    ref = _run(_oracle, tuple(t.double() for t in (x, w_in, w_out, weights)), ids, NEEDS[0])
    tol = 1e-10 if dtype == torch.float64 else 3e-2
    for name, got, want in [("y", fast[0], ref[0])] + [(n, fast[1][n], ref[1][n]) for n in NEEDS[0]]:
        assert (got.double() - want).abs().max().item() <= tol * want.abs().max().item(), name


@kernels
@pytest.mark.parametrize("combine", ["slots", "drops"])
@pytest.mark.parametrize("engine", _engines() if ext.available() else [])
def test_streamed_slot_writes_change_nothing(combine, engine):
    """Slot buffers written with non-temporal stores (path.stream; expert_bank.cpp:
    scatter_rows, AVX-512 builds) give the plain stores' bits exactly."""
    tensors = _problem()
    x, w_in, w_out, ids, weights = tensors
    out = []
    for stream in (False, True):
        path = CpuPath(kernel="whole", products=engine, combine="slots", chunk_rows=64, pad=32, stream=stream)
        out.append(_run(_on(path), (x, w_in, w_out, weights), ids, NEEDS[0], combine))
    (y_a, g_a), (y_b, g_b) = out
    assert torch.equal(y_a, y_b)
    for n in NEEDS[0]:
        assert torch.equal(g_a[n], g_b[n]), n


@kernels
@pytest.mark.parametrize("combine", COMBINES)
@pytest.mark.parametrize("engine", _engines() if ext.available() else [])
def test_results_do_not_depend_on_the_thread_count(combine, engine):
    """Each expert's products run on one thread in a fixed order, and each token's rows
    are summed in a fixed order: 1 and 2 threads give bit-identical outputs and
    gradients (what exact resume relies on)."""
    tensors = _problem(T=400, E=16)
    x, w_in, w_out, ids, weights = tensors
    path = CpuPath(kernel="whole", products=engine, combine="scatter" if combine == "scatter" else "slots",
                   chunk_rows=10_000, pad=32)
    old = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append(_run(_on(path), (x, w_in, w_out, weights), ids, NEEDS[0], combine))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(out[0][0], out[1][0])
    for n in NEEDS[0]:
        assert torch.equal(out[0][1][n], out[1][1][n]), n


def test_small_chunks_split_experts():
    """The chunk plan really splits experts, and marks only their first segment first-write."""
    chunks = plan_segments([70, 0, 5, 130], 64)
    seen, firsts = [], {}
    for r0, r1, seg in chunks:
        assert 0 < r1 - r0 <= 64 and seg[0, 1] == 0 and seg[-1, 2] == r1 - r0
        assert len(set(seg[:, 0].tolist())) == len(seg), "one segment per expert in a chunk"
        for e, s, t, first in seg.tolist():
            seen += [e] * (t - s)
            firsts.setdefault(e, []).append(first)
    assert seen == [0] * 70 + [2] * 5 + [3] * 130
    assert firsts == {0: [1, 0], 2: [1], 3: [1, 0, 0]}


def test_one_kernel_call_over_all_chunks_with_slots():
    """With a slot buffer the forward and the backward each make one kernel call over
    every chunk (the threads join once); the scatter combine makes one call per chunk."""
    chunks = plan_segments([70, 0, 5, 130, 40], 64)
    one = list(_calls(chunks, True, []))
    assert len(one) == 1 and one[0][:2] == (0, 245)
    assert one[0][2][:, 1:3].tolist() == [[s + r0, t + r0] for r0, _, seg in chunks for _, s, t, _ in seg.tolist()]
    assert len(list(_calls(chunks, False, []))) == len(chunks) > 1


# ---------------------------------------------------------------- which path runs when


def _call(**kw) -> cpu_path.Call:
    """A call of 8·threads experts with 3 rows each unless changed: many experts per thread."""
    E = 8 * torch.get_num_threads()
    base = dict(T=64, D=32, F=16, K=2, counts=(3,) * E, dtype=torch.float32, act="swiglu", grad=True,
                contiguous=True, packed=False)
    base.update(kw)
    return cpu_path.Call(**base)


def _table():
    """The cases of cpu/path.py's table, each with the kernel it must take on this build."""
    owned = ext.caps().avx512
    built = ext.available()
    return [
        ("decode: inference, <= 4 rows per expert", _call(grad=False), "decode" if built else "chunked"),
        ("decode needs fp32", _call(grad=False, dtype=torch.float64), "chunked"),
        ("a training call of many small experts", _call(),
         ("columns" if owned else "whole") if built else "chunked"),
        ("width not a multiple of 16: no columns", _call(D=24), "whole" if built else "chunked"),
        ("inference of packed weights", _call(grad=False, counts=(9,) * 16, packed=True),
         ("rows" if owned else "whole") if built else "chunked"),
        ("packed, but too wide for rows", _call(grad=False, counts=(9,) * 16, packed=True, D=2048),
         "whole" if built else "chunked"),
        ("fp64: the chunk loop", _call(dtype=torch.float64), "chunked"),
        ("gelu experts: the chunk loop", _call(act="gelu"), "chunked"),
        ("strided weights: the chunk loop", _call(contiguous=False), "chunked"),
        ("few experts per thread (coarse)", _call(counts=(4096,)), "chunked"),
    ]


@pytest.mark.parametrize("case,call,kernel", _table(), ids=lambda v: v if isinstance(v, str) else "")
def test_the_path_table(case, call, kernel):
    path = choose(call)
    assert path.kernel == kernel, (case, path)
    if kernel == "whole":  # an engine that runs here; slots while the buffer is small
        assert path.products in _engines() and path.combine == "slots"
    if kernel == "chunked":
        assert path.products in ("torch", "onednn")


def test_kernels_off_take_the_chunk_loop():
    with settings.use(kernels="off"):
        assert choose(_call()).kernel == choose(_call(grad=False)).kernel == "chunked"


def test_a_layer_says_which_path_it_took():
    cfg = MoEConfig(d_model=32, num_experts=16, top_k=4, d_ff=16, num_shared_experts=1)
    layer = MoELayer(cfg)
    x = torch.randn(2, 40, 32)
    layer(x)
    trained = layer.experts.cpu_state.last_path
    with torch.no_grad():
        layer(x[:, :1])
    assert trained == choose(call_of(x.reshape(-1, 32), *_layer_plan(layer, x), SWIGLU))
    assert layer.experts.cpu_state.last_path.kernel == ("decode" if ext.available() else "chunked")


def _layer_plan(layer, x):
    x_TD = x.reshape(-1, 32)
    plan = layer.dispatch(layer.router(x_TD), layer.cfg)
    return plan, plan.counts_E.tolist(), layer.experts.w_in, layer.experts.w_out


def test_settings_override_fields_of_the_path():
    layer = MoELayer(MoEConfig(d_model=32, num_experts=16, top_k=4, d_ff=16))
    with settings.use(cpu_path={"kernel": "chunked", "products": "torch", "chunk_rows": 7}):
        layer(torch.randn(2, 40, 32))
    last = layer.experts.cpu_state.last_path
    assert (last.kernel, last.products, last.chunk_rows) == ("chunked", "torch", 7)
    with pytest.raises(ValueError, match="unknown field"):
        settings.use(cpu_path={"kernal": "whole"}).__enter__()


def test_a_path_that_cannot_run_is_refused():
    x, w_in, w_out, ids, weights = _problem()
    plan = _plan(ids, weights)
    with pytest.raises(ValueError, match="takes contiguous float32 SwiGLU"):
        cpu_experts(x.double(), plan, w_in.double(), w_out.double(), SWIGLU,
                    path=CpuPath(kernel="whole", products="blas"))
    with pytest.raises(ValueError, match="packed" if ext.caps().avx512 else "AVX-512"):
        with torch.no_grad():
            cpu_experts(x, plan, w_in, w_out, SWIGLU, path=CpuPath(kernel="rows", products="micro"))
    with pytest.raises(ValueError, match="runs products on micro, matmul or blas"):
        CpuPath(kernel="whole", products="torch")
    with pytest.raises(ValueError, match="kernel='wholes' is not one of"):
        CpuPath(kernel="wholes")


@pytest.mark.parametrize("grad", [True, False])
def test_an_inference_call_keeps_nothing_for_a_backward(grad):
    """Under no_grad the call says grad=False although the weights require grad (the
    paths' Functions save pre-activations only for grad=True calls)."""
    x, w_in, w_out, ids, weights = _problem()
    with torch.set_grad_enabled(grad):
        call = call_of(x, _plan(ids, weights), [1], w_in.requires_grad_(), w_out, SWIGLU)
    assert call.grad is grad


@kernels
def test_the_kernel_rejects_bad_segments_and_tokens():
    x, w_in, w_out, ids, weights = _problem(T=10, E=4, K=1, empty=())
    out = torch.empty(10, 32)
    tok, w = torch.arange(10), torch.ones(10)
    seg = torch.tensor([[0, 0, 10, 1]])
    fwd = dict(step=32, engine="micro", stream=False)
    with pytest.raises(RuntimeError, match="segment 0"):
        bank_ops.forward(x, tok, w, torch.tensor([[9, 0, 10, 1]]), w_in, w_out, out, tok, [], [], **fwd)
    with pytest.raises(RuntimeError, match="token index 10 out of range"):
        bank_ops.forward(x, torch.full((10,), 10), w, seg, w_in, w_out, out, tok, [], [], **fwd)
    with pytest.raises(RuntimeError, match="destination row 10 out of range"):
        bank_ops.forward(x, tok, w, seg, w_in, w_out, out, tok + 1, [], [], **fwd)
    with pytest.raises(RuntimeError, match="x must be"):
        bank_ops.forward(x.double(), tok, w, seg, w_in, w_out, out, tok, [], [], **fwd)
    two = torch.tensor([[0, 0, 4, 1], [1, 4, 10, 1]])
    with pytest.raises(RuntimeError, match="not inside one block of h"):
        bank_ops.forward(x, tok, w, two, w_in, w_out, out, tok, [torch.empty(5, 48), torch.empty(5, 48)], [0, 5],
                         **fwd)
    with pytest.raises(RuntimeError, match="each block of h"):
        bank_ops.forward(x, tok, w, two, w_in, w_out, out, tok, [torch.empty(10, 47)], [0], **fwd)
    with pytest.raises(RuntimeError, match="row starts of h must ascend"):
        bank_ops.forward(x, tok, w, two, w_in, w_out, out, tok, [torch.empty(6, 48), torch.empty(4, 48)], [4, 0],
                         **fwd)
    with pytest.raises(RuntimeError, match="engine 7 is not"):
        ext.op("expert_bank_fwd")(x, tok, w, seg, w_in, w_out, out, tok, [], [], 32, 7, False)
    apart = torch.tensor([[0, 0, 3, 1], [1, 3, 6, 1], [0, 6, 10, 0]])
    e = torch.empty(0)
    with pytest.raises(RuntimeError, match="segments must follow each other"):
        bank_ops.backward(x, tok, w, apart, w_in, w_out, [torch.empty(10, 48)], [0], torch.randn(10, 32), e, e, e,
                          torch.empty_like(w_in), e, **fwd)


@kernels
def test_the_kernel_face_equals_its_torch_reference():
    x, w_in, w_out, ids, weights = _problem(T=50, E=4, K=2, empty=())
    plan = _plan(ids, weights)
    counts = plan.counts_E
    seg = torch.tensor([[e, s, s + n, 1] for e, (s, n) in enumerate(zip(
        [0, *counts.cumsum(0)[:-1].tolist()], counts.tolist(), strict=True))])
    for engine in _engines():
        out = torch.zeros(100, 32)
        bank_ops.forward(x, plan.token_idx_R, plan.weights_R, seg, w_in, w_out, out, plan.slot_idx_R, [], [],
                         step=32, engine=engine, stream=False)
        y = out.view(50, 2, 32).sum(1)
        want = bank_ops.reference(x, plan.token_idx_R, plan.weights_R, counts, w_in, w_out)
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


def test_probed_matmul_is_what_runs():
    """oneDNN's matmul is chosen only where a probe call ran (torch refuses it on CPUs
    without avx512bw/vl/dq or avx_ne_convert, even for fp32)."""
    works = bank_ops.matmul_works()
    assert ("matmul" in _engines()) == works
    if not works:
        assert all(choose(_call(D=D, F=F)).products != "matmul" for D, F in ((32, 16), (1024, 704)))

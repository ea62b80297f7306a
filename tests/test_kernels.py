"""The C++ top-k, SwiGLU and row kernels (ops/topk.py, ops/swiglu.py, ops/rows.py) against
their torch references, and the chunk loop with the kernels against the same loop on
torch's ops. (The decode mat-vec kernel is tested in test_decode.py.)"""

from __future__ import annotations

import pytest
import torch

from moekit import MoEConfig, MoELayer, settings
from moekit.moe.router import base as router_base
from moekit.ops import ext, rows, swiglu, topk

pytestmark = pytest.mark.skipif(not ext.available(), reason="needs the C++ kernels")


def test_kernels_are_built():
    """Otherwise the tests below would check the references against themselves."""
    assert ext.available()
    assert topk.applies(torch.zeros(topk.MIN_ROWS, 8), 2) and swiglu.applies(torch.zeros(2, 4))
    assert not topk.applies(torch.zeros(topk.MIN_ROWS - 1, 8), 2)  # decode steps: torch.topk


def _scores(kind: str, T: int, E: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(T, E, generator=g)
    if kind == "ties":  # few distinct values: ties everywhere, lower id must win
        x = torch.randint(-2, 3, (T, E), generator=g).float()
        x[x == 0] = torch.where(torch.rand(int((x == 0).sum()), generator=g) < 0.5, -0.0, 0.0)
    elif kind == "nan":
        x[::3, 1] = float("nan")
        x[::5, E - 1] = -float("nan")
    elif kind == "inf":
        x[::2] = float("-inf")  # whole rows of -inf still give k distinct ids
        x[::4, E // 2] = float("inf")
    return x


@pytest.mark.parametrize("kind", ["random", "ties", "nan", "inf"])
@pytest.mark.parametrize("T,E,k", [(1, 8, 2), (37, 8, 1), (64, 64, 8), (33, 128, 4), (5, 16, 16), (17, 3, 3), (20, 2, 1),
                                   (50, 300, 16)])
def test_topk_kernel_matches_stable_sort(kind, T, E, k):
    """Every row count (min_rows=1: the kernel normally leaves fewer than MIN_ROWS rows to torch)."""
    g = torch.Generator().manual_seed(T * E + k)
    x = _scores(kind, T, E, g)
    assert topk.applies(x, k, min_rows=1)
    got = topk.topk_ids(x, k, min_rows=1)
    assert got.dtype == torch.int64 and got.shape == (T, k)
    assert torch.equal(got, topk.reference(x, k))


def test_topk_outside_the_kernel_is_torch_topk():
    """k above KMAX, fp64, a 3-D input or few rows: torch.topk, same ids on distinct scores."""
    g = torch.Generator().manual_seed(0)
    R = topk.MIN_ROWS
    for x, k in [(torch.randn(R, 40, generator=g), 20), (torch.randn(R, 12, dtype=torch.float64, generator=g), 3),
                 (torch.randn(2, R, 12, generator=g), 3), (torch.randn(R - 1, 12, generator=g), 3)]:
        assert not topk.applies(x, k)
        assert torch.equal(topk.topk_ids(x, k), torch.topk(x, k, dim=-1).indices)


def test_routers_use_the_kernel():
    """The routers' top-k goes through ops.topk, which takes the kernel at this size: the
    router's ids are the kernel's ids on the router's logits (ties to the lower id)."""
    layer = MoELayer(MoEConfig(d_model=16, num_experts=8, top_k=3, d_ff=8))
    x = torch.randn(topk.MIN_ROWS, 16)
    routing = layer.router(x)
    assert router_base.topk is topk and topk.applies(routing.logits_TE, 3)
    assert torch.equal(routing.expert_ids_TK, topk.reference(routing.logits_TE, 3))


def _swiglu_case(m: int, n: int, F: int, seed: int, strided: bool):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(m, 2 * F + (7 if strided else 0), generator=g) * 3
    h = h[:, : 2 * F]  # strided=True: rows are contiguous, the tensor is not
    h[n:] = 0  # padding rows
    return h, torch.rand(n, generator=g), torch.randn(m, F, generator=g)


CASES = [(64, 50, 37, False), (96, 96, 128, True), (32, 0, 20, False), (40, 33, 16, True), (3, 3, 1, False)]


@pytest.mark.parametrize("m,n,F,strided", CASES)
@pytest.mark.parametrize("weighted", [True, False])
def test_swiglu_forward_matches_reference(m, n, F, strided, weighted):
    h, w, _ = _swiglu_case(m, n, F, m + F, strided)
    w = w if weighted else None
    out = torch.full((m, F), float("nan"))
    got = swiglu.forward(h, w, out)
    assert got is out
    ref = swiglu.forward_reference(h.double(), (w if weighted else torch.empty(0)).double())
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("m,n,F,strided", CASES)
@pytest.mark.parametrize("need_a,need_dw", [(True, True), (False, True), (True, False), (False, False)])
def test_swiglu_backward_matches_autograd(m, n, F, strided, need_a, need_dw):
    h, w, ub = _swiglu_case(m, n, F, m * F + 1, strided)
    dh = torch.full((m, 2 * F), float("nan"))
    a = torch.full((m, F), float("nan")) if need_a else None
    dw = swiglu.backward(h, ub, w, dh, a, need_dw)
    rdh, raw, rdw = swiglu.backward_reference(h.double(), ub.double(), w.double())
    torch.testing.assert_close(dh.double(), rdh, atol=1e-5, rtol=1e-5)
    assert (dh[n:] == 0).all()  # padding rows get exactly zero
    if need_a:
        torch.testing.assert_close(a.double(), raw, atol=1e-5, rtol=1e-5)
    assert (dw is None) == (not need_dw)
    if need_dw:
        torch.testing.assert_close(dw.double(), rdw, atol=1e-4, rtol=1e-5)


def test_swiglu_reference_runs_without_the_build(monkeypatch):
    monkeypatch.setitem(ext._state, "built", False)
    h, w, ub = _swiglu_case(8, 6, 5, 3, False)
    out = swiglu.forward(h, w, torch.empty(8, 5))
    torch.testing.assert_close(out, swiglu.forward_reference(h, w))
    dh = torch.empty(8, 10)
    dw = swiglu.backward(h, ub, w, dh, None, True)
    rdh, _, rdw = swiglu.backward_reference(h, ub, w)
    torch.testing.assert_close(dh, rdh)
    torch.testing.assert_close(dw, rdw)


@pytest.mark.parametrize("shared", [0, 1])
def test_chunk_loop_with_kernels_equals_it_on_torch_ops(shared):
    """The whole layer through the chunk loop, fp32, padded products included (T big
    enough for 32-row experts): outputs and every gradient with the SwiGLU and row kernels
    equal those with the kernels off (torch's ops)."""
    cfg = MoEConfig(d_model=40, num_experts=4, top_k=2, d_ff=24, num_shared_experts=shared, init_std=0.3)
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    x = torch.randn(300, 40)

    def run():
        xg = x.clone().requires_grad_()
        for p in layer.parameters():
            p.grad = None
        y = layer(xg).y
        y.pow(2).sum().backward()
        return [y.detach(), xg.grad] + [p.grad.clone() for p in layer.parameters()]

    path = {"kernel": "chunked", "products": "torch", "chunk_rows": 64}
    with settings.use(cpu_path=path):
        assert swiglu.applies(torch.zeros(2, 4))
        fused = run()
    with settings.use(kernels="off", cpu_path=path):
        assert not swiglu.applies(torch.zeros(2, 4))
        plain = run()
    for a, b in zip(fused, plain, strict=True):
        # fp32 sums in another order (router gradient: 300 tokens with cancellation):
        # relative to the tensor's scale
        assert (a - b).abs().max() <= 2e-5 * b.abs().max(), (a - b).abs().max()


@pytest.mark.parametrize("T,D,idx", [(50, 130, [3, 3, 7, 49]), (8, 64, []), (300, 512, list(range(0, 300, 3)) * 2),
                                     (5, 7, [4, 0, 4, 4])])
def test_index_add_rows_matches_index_add(T, D, idx):
    """Repeated rows included: the kernel splits columns between threads, not rows."""
    g = torch.Generator().manual_seed(T + D)
    y = torch.randn(T, D + 3, generator=g)[:, :D]  # rows contiguous, the tensor is not
    idx = torch.tensor(idx, dtype=torch.int64)
    src = torch.randn(len(idx), D, generator=g)
    want = y.clone().index_add_(0, idx, src)
    got = rows.index_add_(y, idx, src)
    assert got is y and rows.applies(y, src)
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # same adds in the same order per element
    with pytest.raises(RuntimeError, match="out of range"):
        rows.index_add_(y, torch.tensor([T]), src[:1] if len(src) else torch.zeros(1, D))


@pytest.mark.parametrize("T,K,D", [(50, 2, 130), (0, 4, 64), (300, 8, 512), (7, 1, 5), (1000, 4, 16)])
def test_sum_slots_matches_its_reference(T, K, D):
    """The same adds in the same order (k = 0, 1, ...): bit-identical, at any thread count."""
    src = torch.randn(T * K, D, generator=torch.Generator().manual_seed(T + K))
    want = rows.sum_slots_reference(src, K)
    assert want.shape == (T, D)
    torch.testing.assert_close(want, src.view(T, K, D).sum(1), rtol=1e-6, atol=1e-5)
    old = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert torch.equal(rows.sum_slots(src, K), want)
    finally:
        torch.set_num_threads(old)
    with pytest.raises(RuntimeError, match="do not split"):
        ext.op("sum_slots")(torch.zeros(5, 3), 2)


def test_slot_buffer_is_reused_only_when_free():
    rows.release()
    like = torch.zeros(1)
    a = rows.slot_buffer(10, 4, like, zero=False, min_pooled_bytes=0)
    held = a.data_ptr()
    b = rows.slot_buffer(10, 4, like, zero=True, min_pooled_bytes=0)  # a is still alive: a new buffer
    assert b.data_ptr() != held and b.abs().sum() == 0
    del a, b
    c = rows.slot_buffer(6, 4, like, zero=True, min_pooled_bytes=0)  # free again: reused, zeroed when asked
    assert c.shape == (6, 4) and c.abs().sum() == 0
    c.fill_(1.0)
    del c
    d = rows.slot_buffer(20, 4, like, zero=False, min_pooled_bytes=0)  # bigger than the pooled one: a new one
    assert d.shape == (20, 4)

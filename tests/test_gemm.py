"""ops/gemm.py (oneDNN or torch per product) and layers.linear against torch's kernel.

The suite's tensors are small, below gemm.MIN_MACS, so under the default "auto" backend
nearly every product here would stay on torch; these tests force "onednn" so the fast
kernel really runs, in the GEMMs themselves, in Linear's backward, in the expert
bank's chunked forward and backward, and in a whole model.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moekit import MoEConfig, MoELayer
from moekit.layers import Linear, linear
from moekit.moe.experts import grouped
from moekit.ops import ext, gemm

needs_onednn = pytest.mark.skipif(not gemm.onednn_available(), reason="torch built without oneDNN")
F32 = dict(atol=1e-5, rtol=1e-5)


def _close64(got: torch.Tensor, ref64: torch.Tensor, tol: float = 1e-5) -> None:
    """fp32 result within tol of the fp64 reference, relative to the reference's scale."""
    err = (got.double() - ref64).abs().max().item() / max(ref64.abs().max().item(), 1e-30)
    assert err <= tol, err


@needs_onednn
@pytest.mark.parametrize("M,N,K", [(1, 33, 17), (7, 64, 40), (130, 96, 257)])
def test_onednn_products_match_fp64(M, N, K):
    g = torch.Generator().manual_seed(M)
    a = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g)
    c = torch.randn(N, K, generator=g)
    with gemm.backend("onednn"):
        _close64(gemm.linear(a, w), a.double() @ w.double().T)
        _close64(gemm.linear(a, w, b), a.double() @ w.double().T + b.double())
        _close64(gemm.mm(a, w.t()), a.double() @ w.double().T)  # transposed operand
        out = torch.full((M + 3, N), 7.0)
        gemm.linear(a, w, out=out[2 : 2 + M])  # into a slice: neighbours untouched
        _close64(out[2 : 2 + M], a.double() @ w.double().T)
        assert (out[:2] == 7).all() and (out[2 + M :] == 7).all()
        acc = c.clone()
        gemm.addmm_(acc, w.t().t(), torch.eye(K))  # c += w · I
        _close64(acc, c.double() + w.double())


@needs_onednn
def test_onednn_strided_operands():
    """Column slices and transposes, as the expert bank's backward passes them."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 2 * 24, generator=g)
    w = torch.randn(24, 31, generator=g)
    x = torch.randn(50, 31, generator=g)
    with gemm.backend("onednn"):
        _close64(gemm.mm(h[:, 24:], w), h[:, 24:].double() @ w.double())
        _close64(gemm.mm(h[:, :24].t(), x), h[:, :24].double().T @ x.double())


@pytest.mark.skipif(not ext.available(), reason="needs the C++ kernels")
@pytest.mark.parametrize("M,N", [(2048, 128), (37, 19), (16, 16), (15, 40), (1, 5), (64, 1), (0, 7)])
def test_transpose_kernel_equals_contiguous(M, N):
    """csrc/transpose.cpp: exact, whole tiles and ragged edges, and a source whose rows
    are longer than their used part (a column slice)."""
    src = torch.randn(M, N + 3)[:, 1 : 1 + N]  # row stride N + 3
    out = torch.full((N, M), float("nan"))
    ext.op("transpose_into")(src, out)
    assert torch.equal(out, src.t().contiguous())
    assert torch.equal(gemm._row_major(src.t()), src.t().contiguous())


def test_row_major_leaves_other_layouts_alone():
    a = torch.randn(6, 5)
    assert gemm._row_major(a) is a  # already rows
    t64 = a.double().t()
    assert gemm._row_major(t64) is t64  # other dtypes: oneDNN copies them itself
    col = a[:, 1:2]  # (6, 1): stride (5, 1), rows already contiguous
    assert gemm._row_major(col) is col


@needs_onednn
def test_onednn_bfloat16_is_close():
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(64, 128, generator=g), torch.randn(32, 128, generator=g)
    with gemm.backend("onednn"):
        y = gemm.linear(a.bfloat16(), w.bfloat16())
    assert y.dtype == torch.bfloat16
    _close64(y, a.bfloat16().double() @ w.bfloat16().double().T, tol=1e-2)


class _Spy:
    """Stands in for the oneDNN op: records that it ran, computes with torch."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, a, w, b, *rest):
        self.calls += 1
        return nn.functional.linear(a, w, b)


@pytest.mark.parametrize("backend,shape,dtype,grad,expect", [
    ("auto", (1024, 1024, 1), torch.float32, False, True),     # 1M multiply-adds
    ("auto", (8, 64, 64), torch.float32, False, False),        # small: torch's call is quicker
    ("onednn", (8, 64, 64), torch.float32, False, True),
    ("torch", (1024, 1024, 1), torch.float32, False, False),
    ("onednn", (8, 64, 64), torch.float64, False, False),      # oneDNN has no fp64
    ("onednn", (8, 64, 64), torch.float32, True, False),       # autograd would need its formula
    ("onednn", (0, 64, 64), torch.float32, False, False),      # empty
])
def test_dispatch_rule(monkeypatch, backend, shape, dtype, grad, expect):
    spy = _Spy()
    monkeypatch.setattr(gemm, "_ONEDNN_LINEAR", spy)
    M, K, N = shape
    a = torch.randn(M, K, dtype=dtype, requires_grad=grad)
    w = torch.randn(N, K, dtype=dtype)
    with gemm.backend(backend):
        y = gemm.linear(a, w)
    assert (spy.calls == 1) is expect
    torch.testing.assert_close(y, nn.functional.linear(a, w))


def test_backend_names_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="gemm backend='mkl'.*auto, onednn, torch"):
        gemm.set_backend("mkl")
    assert gemm.get_backend() == "auto"
    with gemm.backend("torch"):
        assert gemm.get_backend() == "torch"
    assert gemm.get_backend() == "auto"


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_linear_outputs_and_grads_match_torch(bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, 48, generator=g, requires_grad=True)
    lin = Linear(48, 40, bias=bias)
    dy = torch.randn(3, 20, 40, generator=g)
    with gemm.backend("onednn"):
        y = lin(x)
        got = torch.autograd.grad(y, [x, *lin.parameters()], dy)
    ref_y = nn.functional.linear(x, lin.weight, lin.bias)
    ref = torch.autograd.grad(ref_y, [x, *lin.parameters()], dy)
    torch.testing.assert_close(y, ref_y, **F32)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, **F32)


def test_linear_gradcheck_and_state_dict():
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear, (x, w, b))
    assert Linear(5, 4).state_dict().keys() == nn.Linear(5, 4).state_dict().keys()


@needs_onednn
@pytest.mark.parametrize("expert", ["swiglu", "gelu"])
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_expert_bank_on_onednn_matches_loop_oracle(monkeypatch, expert, dispatch):
    """The grouped backend with every product on oneDNN (and rows split over several
    chunks, so weight gradients accumulate) against the loop oracle on torch's kernel."""
    monkeypatch.setattr(grouped, "MIN_ROWS", 1)
    monkeypatch.setattr(grouped, "CHUNK_BYTES", 9 * 4 * 48)  # 9 rows of width 48 in fp32
    base = dict(d_model=24, num_experts=6, top_k=2, d_ff=20, expert=expert, dispatch=dispatch,
                capacity_factor=1.0, num_shared_experts=1, shared_d_ff=12, init_std=0.3)
    torch.manual_seed(0)
    fast = MoELayer(MoEConfig(**base, expert_backend="grouped"))
    oracle = MoELayer(MoEConfig(**base, expert_backend="loop"))
    oracle.load_state_dict(fast.state_dict())
    x = torch.randn(4, 15, 24)
    results = []
    for layer, gemm_backend in ((fast, "onednn"), (oracle, "torch")):
        xg = x.clone().requires_grad_()
        with gemm.backend(gemm_backend):
            y = layer(xg).y
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        results.append([y, xg.grad] + [p.grad for p in layer.parameters()])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **F32)


@needs_onednn
def test_lm_logits_and_grads_same_on_both_kernels():
    from moekit.models import MoELM, get_preset

    torch.manual_seed(0)
    model = MoELM(get_preset("tiny", 64))
    ids = torch.randint(0, 64, (2, 16))
    outs = []
    for name in ("onednn", "torch"):
        model.zero_grad(set_to_none=True)
        with gemm.backend(name):
            out = model(ids, targets_BS=ids)
            out.loss.backward()
        outs.append([out.logits] + [p.grad for p in model.parameters() if p.grad is not None])
    assert len(outs[0]) == len(outs[1]) > 5
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

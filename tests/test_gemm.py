"""ops/gemm.py (oneDNN, torch or the mat-vec kernel per product) and layers.linear against
torch's kernel.

The suite's tensors are small, below gemm.MIN_MACS, so under settings.gemm="auto" nearly
every product here would stay on torch; these tests set gemm="onednn" so the fast kernel
really runs, in the GEMMs themselves, in Linear's backward, in the chunk loop's forward
and backward, and in a whole model. `gemm.kernel_for` says which kernel a product takes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moekit import MoEConfig, MoELayer, settings
from moekit.layers import Linear, linear
from moekit.ops import ext, gemm, tune

needs_onednn = pytest.mark.skipif(not gemm.onednn_available(), reason="torch built without oneDNN")
needs_bf16 = pytest.mark.skipif(not gemm.onednn_bf16(), reason="oneDNN has no bf16 kernels on this CPU")
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
    with settings.use(gemm="onednn"):
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
    with settings.use(gemm="onednn"):
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


@needs_bf16
def test_onednn_bfloat16_is_close():
    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(64, 128, generator=g), torch.randn(32, 128, generator=g)
    with settings.use(gemm="onednn"):
        y = gemm.linear(a.bfloat16(), w.bfloat16())
    assert y.dtype == torch.bfloat16
    _close64(y, a.bfloat16().double() @ w.bfloat16().double().T, tol=1e-2)


@pytest.mark.parametrize("mode,shape,dtype,grad,expect", [
    ("auto", (1024, 1024, 1), torch.float32, False, "onednn"),  # 1M multiply-adds: oneDNN first by rule
    ("auto", (8, 64, 64), torch.float32, False, "torch"),        # small: torch's call is quicker
    ("auto", (2, 512, 256), torch.float32, False, "rowmv"),      # decode rows: the mat-vec kernel
    ("onednn", (8, 64, 64), torch.float32, False, "onednn"),
    ("torch", (1024, 1024, 1), torch.float32, False, "torch"),
    ("onednn", (8, 64, 64), torch.float64, False, "torch"),      # oneDNN has no fp64
    ("onednn", (8, 64, 64), torch.float32, True, "torch"),       # autograd would need its formula
    ("onednn", (0, 64, 64), torch.float32, False, "torch"),      # empty
])
def test_kernel_rule(mode, shape, dtype, grad, expect):
    if not gemm.onednn_available() or (expect == "rowmv" and not ext.available()):
        pytest.skip("needs oneDNN (and the kernels for rowmv)")
    M, K, N = shape
    a = torch.randn(M, K, dtype=dtype, requires_grad=grad)
    w = torch.randn(N, K, dtype=dtype)
    with settings.use(gemm=mode):
        assert gemm.kernel_for(a, w) == expect
        y = gemm.linear(a, w)
    if M:
        _close64(y.detach(), a.detach().double() @ w.double().T)
    assert y.shape == (M, N)


def test_bf16_without_onednn_kernels_stays_on_torch():
    """On CPUs without oneDNN's bf16 kernels (AVX2 only), bf16 products never reach oneDNN,
    which would refuse them; torch computes them."""
    a, w = torch.randn(64, 128).bfloat16(), torch.randn(32, 128).bfloat16()
    with settings.use(gemm="onednn"):
        assert gemm.kernel_for(a, w) == ("onednn" if gemm.onednn_bf16() else "torch")
        y = gemm.linear(a, w)
    _close64(y, a.double() @ w.double().T, tol=1e-2)


def test_settings_names_are_checked():
    with pytest.raises(ValueError, match="gemm='mkl' is not one of auto, onednn, torch"):
        settings.use(gemm="mkl").__enter__()
    assert settings.get().gemm == "auto"
    with settings.use(gemm="torch"):
        assert settings.get().gemm == "torch"
    assert settings.get().gemm == "auto"


@needs_onednn
def test_measured_choices_are_timed_once_and_kept(tmp_path):
    """settings.tune="measure": the candidates are timed on the first product of a shape
    class, the winner is written to the machine's file and reused (no second timing);
    a fresh process (a cleared memory) reads it back."""
    made = []

    def candidate(name):
        def make():
            made.append(name)
            return lambda: None
        return make

    with settings.use(tune="measure", cache_dir=str(tmp_path)):
        first = tune.pick("test shape", {"a": candidate("a"), "b": candidate("b")})
        again = tune.pick("test shape", {"a": candidate("a"), "b": candidate("b")})
        assert first == again and sorted(made) == ["a", "b"]
        assert tune.cache_file().exists() and "test shape" in tune.cache_file().read_text()
        tune.forget()
        assert tune.pick("test shape", {"a": candidate("a"), "b": candidate("b")}) == first
        assert sorted(made) == ["a", "b"]
    with settings.use(tune="rules"):
        assert tune.pick("other", {"b": candidate("b"), "a": candidate("a")}) == "b"
    assert sorted(made) == ["a", "b"]


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_linear_outputs_and_grads_match_torch(bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 20, 48, generator=g, requires_grad=True)
    lin = Linear(48, 40, bias=bias)
    dy = torch.randn(3, 20, 40, generator=g)
    with settings.use(gemm="onednn"):
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
def test_expert_bank_on_onednn_matches_loop_oracle(expert, dispatch):
    """The chunk loop with every product on oneDNN (and rows split over several chunks, so
    weight gradients accumulate) against the loop oracle on torch's kernel."""
    base = dict(d_model=24, num_experts=6, top_k=2, d_ff=20, expert=expert, dispatch=dispatch,
                capacity_factor=1.0, num_shared_experts=1, shared_d_ff=12, init_std=0.3)
    torch.manual_seed(0)
    fast = MoELayer(MoEConfig(**base))
    oracle = MoELayer(MoEConfig(**base, experts_impl="loop"))
    oracle.load_state_dict(fast.state_dict())
    x = torch.randn(4, 15, 24)
    results = []
    path = {"kernel": "chunked", "products": "onednn", "pad": 32, "chunk_rows": 9}
    for layer, gemm_mode in ((fast, "onednn"), (oracle, "torch")):
        xg = x.clone().requires_grad_()
        with settings.use(gemm=gemm_mode, cpu_path=path):
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
        with settings.use(gemm=name):
            out = model(ids, targets_BS=ids)
            out.loss.backward()
        outs.append([out.logits] + [p.grad for p in model.parameters() if p.grad is not None])
    assert len(outs[0]) == len(outs[1]) > 5
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

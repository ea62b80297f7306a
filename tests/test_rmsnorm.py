"""The RMSNorm kernel (ops/rmsnorm.py, ops/csrc/rmsnorm.cpp) against torch's F.rms_norm in
float64: output and the gradients of input and weight, over widths that are and are not
multiples of the kernel's 16 lanes and row counts across its 64-row blocks; thread
invariance; where it steps aside; and the models' norm with and without it."""

from __future__ import annotations

import pytest
import torch

from moekit import settings
from moekit.models import MoELM, get_preset
from moekit.ops import ext, rmsnorm

pytestmark = pytest.mark.skipif(not ext.available(), reason="needs the C++ kernels")


def _run(fn, x, w, dy):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y = fn(x, w, 1e-5)
    return (y.detach(), *torch.autograd.grad(y, (x, w), dy))


@pytest.mark.parametrize("shape", [(16, 128, 128), (3, 5, 20), (130, 48), (1, 7), (2, 1, 16), (65, 8)])
def test_kernel_matches_fp64_reference(shape):
    g = torch.Generator().manual_seed(0)
    x, w, dy = torch.randn(*shape, generator=g), torch.randn(shape[-1], generator=g), torch.randn(*shape, generator=g)
    assert rmsnorm.applies(x, w)
    got = _run(rmsnorm.rms_norm, x, w, dy)
    want = _run(rmsnorm.reference, x.double(), w.double(), dy.double())
    for name, a, b in zip(("y", "dx", "dw"), got, want, strict=True):
        err = (a.double() - b).abs().max().item() / b.abs().max().item()
        assert err <= 1e-6, f"{name}: relative error {err}"


def test_non_contiguous_input_and_frozen_weight():
    x = torch.randn(8, 40)[:, ::2]  # stride 2
    w = torch.randn(20)
    xr = x.clone().requires_grad_()
    y = rmsnorm.rms_norm(xr, w, 1e-6)  # w needs no gradient
    (dx,) = torch.autograd.grad(y, xr, torch.ones_like(y))
    xr64 = x.double().requires_grad_()
    y64 = rmsnorm.reference(xr64, w.double(), 1e-6)
    (dx64,) = torch.autograd.grad(y64, xr64, torch.ones_like(y64))
    torch.testing.assert_close(y.double(), y64, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dx.double(), dx64, atol=1e-5, rtol=1e-5)


def test_result_does_not_depend_on_thread_count():
    g = torch.Generator().manual_seed(1)
    x, w, dy = torch.randn(1000, 96, generator=g), torch.randn(96, generator=g), torch.randn(1000, 96, generator=g)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(rmsnorm.rms_norm, x, w, dy)
        torch.set_num_threads(2)
        two = _run(rmsnorm.rms_norm, x, w, dy)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


def test_steps_aside_where_it_cannot_run():
    x, w = torch.randn(4, 16), torch.randn(16)
    assert rmsnorm.applies(x, w)
    assert not rmsnorm.applies(x.double(), w.double())
    assert not rmsnorm.applies(x.bfloat16(), w)
    assert not rmsnorm.applies(x[:0], w)  # empty
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not rmsnorm.applies(x, w)
    # the fallback is the reference itself
    torch.testing.assert_close(rmsnorm.rms_norm(x.double(), w.double(), 1e-5),
                               rmsnorm.reference(x.double(), w.double(), 1e-5))


def test_kernel_rejects_bad_inputs():
    op = ext.op("rmsnorm_fwd")
    x, w = torch.randn(4, 16), torch.randn(16)
    with pytest.raises(RuntimeError, match="contiguous CPU float32"):
        op(x.t(), torch.randn(4), 1e-5, torch.empty(16, 4), torch.empty(16))
    with pytest.raises(RuntimeError, match="rstd"):
        op(x, w, 1e-5, torch.empty(4, 16), torch.empty(3))


def test_model_same_with_and_without_kernel():
    """The tiny preset's logits and every parameter gradient with the kernels on and off."""
    torch.manual_seed(0)
    model = MoELM(get_preset("tiny", 260).replace(n_layers=2))
    ids = torch.randint(0, 256, (2, 33))
    norm = model.layers[0].attn_norm
    assert rmsnorm.applies(torch.zeros(2, 33, model.cfg.d_model), norm.weight), "the kernel would not run"

    def run():
        model.zero_grad(set_to_none=True)
        logits = model(ids).logits
        logits.float().pow(2).mean().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    on_logits, on_grads = run()
    with settings.use(kernels="off"):
        assert not rmsnorm.applies(torch.zeros(2, 33, model.cfg.d_model), norm.weight)
        off_logits, off_grads = run()
    torch.testing.assert_close(on_logits, off_logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(on_grads, off_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

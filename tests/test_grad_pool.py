"""ops/grad_pool.py: the expert bank's gradient buffers are reused across steps only when
nothing else holds them, and a reused buffer never changes a gradient someone kept."""

from __future__ import annotations

import gc

import pytest
import torch

from moekit import MoEConfig, MoELayer, settings
from moekit.ops import grad_pool

D = 256
# experts big enough to be pooled: w_in (8, 2048, 256) 16 MiB, w_out (8, 256, 1024) 8 MiB
CFG = MoEConfig(d_model=D, num_experts=8, top_k=2, d_ff=1024, init_std=0.05)


@pytest.fixture
def layer():
    assert CFG.num_experts * CFG.d_ff * D * 4 >= grad_pool.MIN_BYTES
    torch.manual_seed(0)
    return MoELayer(CFG)


def _step(layer, seed):
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(seed))
    layer(x).y.pow(2).sum().backward()


def _fresh_grads(layer, seed):
    """The same step's gradients with the pool off: the reference values."""
    saved = {n: p.grad for n, p in layer.named_parameters()}
    for p in layer.parameters():
        p.grad = None
    with settings.use(grad_pool=False):
        _step(layer, seed)
    ref = {n: p.grad for n, p in layer.named_parameters()}
    for n, p in layer.named_parameters():
        p.grad = saved[n]
    return ref


def test_buffer_is_reused_once_the_gradient_is_dropped(layer):
    w = layer.experts.w_in
    _step(layer, 0)
    first = w.grad.data_ptr()
    w.grad = None
    _step(layer, 1)
    assert w.grad.data_ptr() == first  # same memory, adopted by autograd without a copy
    torch.testing.assert_close(w.grad, _fresh_grads(layer, 1)["experts.w_in"])


def test_a_kept_gradient_is_never_overwritten(layer):
    w = layer.experts.w_in
    _step(layer, 0)
    kept = w.grad  # the user keeps it (e.g. for gradient statistics)
    kept_values = kept.clone()
    w.grad = None
    _step(layer, 1)
    assert w.grad.data_ptr() != kept.data_ptr()
    torch.testing.assert_close(kept, kept_values, rtol=0, atol=0)
    torch.testing.assert_close(w.grad, _fresh_grads(layer, 1)["experts.w_in"])


def test_accumulation_without_zeroing_adds(layer):
    w = layer.experts.w_out
    _step(layer, 0)
    _step(layer, 1)  # p.grad exists: autograd adds the new buffer into it
    _step(layer, 2)
    ref = sum(_fresh_grads(layer, s)["experts.w_out"] for s in (0, 1, 2))
    torch.testing.assert_close(w.grad, ref)


def test_autograd_grad_results_stay_valid(layer):
    x = torch.randn(40, D)
    params = [layer.experts.w_in, layer.experts.w_out]
    g1 = torch.autograd.grad(layer(x).y.pow(2).sum(), params)
    g1_values = [g.clone() for g in g1]
    g2 = torch.autograd.grad(layer(2 * x).y.pow(2).sum(), params)
    for a, b, c in zip(g1, g1_values, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert a.data_ptr() != c.data_ptr()


def test_pool_off_and_release(layer):
    w = layer.experts.w_in
    _step(layer, 0)
    first = w.grad.data_ptr()
    w.grad = None
    first_buf = grad_pool._pool.get(w)
    with settings.use(grad_pool=False):
        _step(layer, 1)
    assert grad_pool._pool.get(w) is first_buf  # off: the pool is neither read nor written
    assert first_buf.data_ptr() == first
    grad_pool.release()
    assert len(grad_pool._pool) == 0
    _step(layer, 2)
    assert len(grad_pool._pool) > 0


def test_entries_go_with_their_parameters():
    grad_pool.release()
    layer = MoELayer(CFG)
    _step(layer, 0)
    assert len(grad_pool._pool) == 2  # w_in and w_out
    del layer
    gc.collect()
    assert len(grad_pool._pool) == 0

"""The softmax-routing kernel (ops/route.py, ops/csrc/route.cpp): probabilities, combine
weights and logsumexp against the torch reference in float64, with the gradient from
each output alone and from all three; renormalised or not; and the topk_softmax router
and its z-loss with the kernel on and off."""

from __future__ import annotations

import pytest
import torch

from moekit import MoEConfig, MoELayer, settings
from moekit.ops import ext, route, topk

pytestmark = pytest.mark.skipif(not ext.available(), reason="needs the C++ kernels")


def _grad_of(fn, x, ids, renorm, grads):
    leaf = x.detach().clone().requires_grad_()
    outs = fn(leaf, ids, renorm)
    pairs = [(o, g) for o, g in zip(outs, grads, strict=True) if g is not None]
    torch.autograd.backward([o for o, _ in pairs], [g.to(o.dtype) for o, g in pairs])
    return [o.detach() for o in outs], leaf.grad


@pytest.mark.parametrize("T,E,K", [(2048, 8, 2), (300, 64, 8), (7, 3, 1), (40, 16, 4), (33, 37, 3)])
@pytest.mark.parametrize("renorm", [True, False])
@pytest.mark.parametrize("which", ["all", "probs", "weights", "lse"])
def test_kernel_matches_fp64_reference(T, E, K, renorm, which):
    g = torch.Generator().manual_seed(T + E + K)
    x = torch.randn(T, E, generator=g, dtype=torch.float64) * 3
    ids = topk.reference(x, K)
    grads = [torch.randn(T, E, generator=g, dtype=torch.float64), torch.randn(T, K, generator=g, dtype=torch.float64),
             torch.randn(T, generator=g, dtype=torch.float64)]
    keep = {"all": (0, 1, 2), "probs": (0,), "weights": (1,), "lse": (2,)}[which]
    grads = [gr if i in keep else None for i, gr in enumerate(grads)]
    assert route.applies(x.float(), ids)
    got, dx = _grad_of(route.route_softmax, x.float(), ids, renorm, grads)
    want, dx64 = _grad_of(route.reference, x, ids, renorm, grads)
    for name, a, b in zip(("probs", "weights", "lse", "dlogits"), (*got, dx), (*want, dx64), strict=True):
        err = (a.double() - b).abs().max().item()
        assert err <= 2e-6 * max(1.0, b.abs().max().item()), f"{name}: max error {err}"


@pytest.mark.parametrize("E", [5, 16, 37])
def test_nan_and_minus_inf_rows_as_torch(E):
    """A NaN anywhere in a row makes the row's probabilities, weights and lse NaN; a row of
    -inf gives NaN probabilities and lse -inf; a -inf logit (a masked expert) gets 0."""
    x = torch.randn(5, E)
    x[0, E - 1] = float("nan")
    x[1, 0] = float("nan")
    x[2] = float("-inf")
    x[3, 1] = float("-inf")
    ids = torch.tensor([[0, 2]] * 5)
    got = route.route_softmax(x, ids, True)
    want = route.reference(x, ids, True)
    for name, a, b in zip(("probs", "weights", "lse"), got, want, strict=True):
        torch.testing.assert_close(a, b, equal_nan=True, msg=lambda m, n=name: f"{n}: {m}")
    assert got[0][:2].isnan().all() and got[0][3, 1] == 0


def test_applies_and_rejects():
    x, ids = torch.randn(4, 5), torch.zeros(4, 2, dtype=torch.int64)
    assert route.applies(x, ids)
    assert not route.applies(x.double(), ids)
    assert not route.applies(x[:0], ids[:0])
    with pytest.raises(RuntimeError, match="out of range"):
        route.route_softmax(x, torch.full((4, 2), 5), True)


@pytest.mark.parametrize("order,normalize,masked", [("before", True, False), ("before", False, True),
                                                    ("after", False, False)])
def test_router_and_z_loss_same_with_and_without_kernel(order, normalize, masked):
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=32, num_experts=8, top_k=2, d_ff=16, softmax_order=order, normalize_topk=normalize,
                    aux_loss_coef=0.01, z_loss_coef=1e-3)
    layer = MoELayer(cfg)
    x = torch.randn(3, 50, 32)
    mask = (torch.arange(50) < 40).expand(3, 50) if masked else None  # padding left out of the losses
    def run():
        layer.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_()
        out = layer(xr, mask=mask)
        (out.y.square().mean() + out.aux_loss).backward()
        return [out.y.detach(), out.aux_loss.detach(), out.losses["z"].detach(), xr.grad,
                *[p.grad for p in layer.parameters()]]

    routing = layer.router(x.reshape(-1, 32))
    assert route.applies(routing.logits_TE, routing.expert_ids_TK), "the kernel would not run"
    on = run()
    with settings.use(kernels="off"):
        assert not route.applies(routing.logits_TE, routing.expert_ids_TK)
        off = run()
    for a, b in zip(on, off, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

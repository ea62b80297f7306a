"""Every fast path against its slow oracle.

- every router x dispatch x expert kind x experts implementation x device against the
  loop oracle (outputs and gradients of the input, router, expert and shared-expert
  weights), train and eval, in each dtype the implementation takes: the CPU wing in fp64
  (exact) and fp32, grouped_mm in fp32 and bf16 (it has no fp64); parametrized over the
  registries so a new variant is covered without editing this file;
- one expert with top-1 equals the dense FFN with the same weights (megablocks' test);
- torch.autograd.gradcheck of small fp64 layers, dropless and capacity paths.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES
from torch.func import functional_call

from moekit import MoEConfig, MoELayer
from moekit.inference import prepare_for_inference
from moekit.moe.dispatch import DISPATCHERS
from moekit.moe.experts import ACTIVATIONS, EXPERTS_IMPLS, DenseFFN
from moekit.moe.router import ROUTERS

FAST_IMPLS = [i for i in EXPERTS_IMPLS.names() if i != "loop"]
DTYPES = {"cpu": [torch.float64, torch.float32], "grouped_mm": [torch.float32, torch.bfloat16]}
# bf16 keeps 8 significant bits: the two sides round their products and sums in
# different orders, so they differ by a few bf16 ulps of values of order 1
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5),
       torch.bfloat16: dict(atol=6e-2, rtol=5e-2)}
IMPL_CASES = [(impl, dt, dev) for impl in FAST_IMPLS for dt in DTYPES[impl] for dev in DEVICES
              if not (impl == "cpu" and dev != "cpu")]


def build_config(router: str, dispatch: str, expert: str, **kw) -> MoEConfig:
    """A small config with shared experts and dropping capacity; a router that rejects
    one of these combinations in its check_config is skipped with its own reason."""
    base = dict(d_model=8, num_experts=4, top_k=2, d_ff=6, router=router, dispatch=dispatch,
                expert=expert, capacity_factor=0.75, num_shared_experts=1, shared_d_ff=5,
                shared_gate=True, init_std=0.5)
    base.update(kw)
    try:
        return MoEConfig(**base)
    except ValueError as e:
        if router == "topk_softmax":  # the default router must accept every combination
            raise
        pytest.skip(f"router {router!r} rejects this combination: {e}")


def layer_inputs(layer: MoELayer, shape, dtype, seed: int = 1, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, layer.cfg.d_model, generator=g, dtype=torch.float64).to(dtype)
    token_ids = torch.randint(0, 50, tuple(shape), generator=g)
    return x.to(device).requires_grad_(), token_ids.to(device)


def run(layer: MoELayer, x: torch.Tensor, token_ids: torch.Tensor, rng_seed: int = 1234):
    """Forward and backward under a fixed RNG state; returns y and every gradient."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    torch.manual_seed(rng_seed)  # noisy / random-second / jitter routers draw the same noise
    out = layer(x, token_ids=token_ids)
    probe = torch.linspace(-1.0, 1.0, out.y.numel(), dtype=out.y.dtype, device=out.y.device).view_as(out.y)
    (out.y * probe).sum().backward()
    grads = {"x": x.grad}
    grads.update({n: p.grad for n, p in layer.named_parameters()})
    return out, grads


def twin_layers(cfg: MoEConfig, impl: str, dtype, train: bool, device: str = "cpu"):
    if impl == "grouped_mm":  # rows of whole 16 bytes (bank.py: grouped_mm_aligned)
        cfg = cfg.replace(d_ff=8)
    fast = MoELayer(cfg.replace(experts_impl=impl)).to(device, dtype).train(train)
    ref = MoELayer(cfg.replace(experts_impl="loop")).to(device, dtype).train(train)
    ref.load_state_dict(fast.state_dict())
    assert fast.experts.impl == impl
    return fast, ref


def assert_same(out_a, grads_a, out_b, grads_b, dtype):
    torch.testing.assert_close(out_a.y, out_b.y, **TOL[dtype])
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        ga, gb = grads_a[name], grads_b[name]
        assert (ga is None) == (gb is None), name
        if ga is not None:
            torch.testing.assert_close(ga, gb, **TOL[dtype], msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("impl,dtype,device", IMPL_CASES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("expert", ACTIVATIONS.names())
@pytest.mark.parametrize("dispatch", DISPATCHERS.names())
@pytest.mark.parametrize("router", ROUTERS.names())
def test_impl_matches_loop_oracle(router, dispatch, expert, impl, dtype, device, train):
    cfg = build_config(router, dispatch, expert, jitter_eps=0.1 if router == "topk_softmax" else 0.0)
    fast, ref = twin_layers(cfg, impl, dtype, train, device)
    x, token_ids = layer_inputs(fast, (2, 5), dtype, device=device)
    out_f, g_f = run(fast, x, token_ids)
    out_r, g_r = run(ref, x, token_ids)
    assert torch.isfinite(out_f.y).all()
    assert out_f.y.abs().max() > 1e-3  # init_std 0.5: a real signal, not tolerance-sized
    assert_same(out_f, g_f, out_r, g_r, dtype)
    # the gradients that must flow do flow (a zero gradient would pass a parity test)
    assert g_f["x"].abs().sum() > 0
    assert g_f["experts.w_in"].abs().sum() > 0 and g_f["experts.w_out"].abs().sum() > 0
    assert g_f["shared.ffn.w_in"].abs().sum() > 0 and g_f["shared.gate.weight"].abs().sum() > 0


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("dispatch", DISPATCHERS.names())
@pytest.mark.parametrize("router", ROUTERS.names())
def test_decode_step_matches_loop_oracle(router, dispatch, T):
    """A no-grad fp32 step of a few tokens of a layer prepared for inference, which for
    SwiGLU runs a fused decode kernel (inference/fused_decode.py) where the layer allows,
    against the loop oracle."""
    cfg = build_config(router, dispatch, "swiglu")
    fast, ref = twin_layers(cfg, "cpu", torch.float32, train=False)
    prepare_for_inference(fast)
    x, token_ids = layer_inputs(fast, (1, T), torch.float32, seed=T)
    with torch.no_grad():
        y = fast(x, token_ids=token_ids).y
        y_ref = ref(x, token_ids=token_ids).y
    assert y.abs().max() > 1e-3
    torch.testing.assert_close(y, y_ref, **TOL[torch.float32])


@pytest.mark.parametrize("router", ROUTERS.names())
def test_stochastic_routers_repeat_under_the_same_seed(router):
    """The parity test relies on this: re-seeding reproduces a training-mode forward."""
    cfg = build_config(router, "dropless", "swiglu", jitter_eps=0.1 if router == "topk_softmax" else 0.0)
    layer = MoELayer(cfg).double().train()
    x, token_ids = layer_inputs(layer, (2, 5), torch.float64)
    out_a, _ = run(layer, x, token_ids, rng_seed=7)
    out_b, _ = run(layer, x, token_ids, rng_seed=7)
    torch.testing.assert_close(out_a.y, out_b.y, atol=0, rtol=0)


@pytest.mark.parametrize("router", ["noisy_topk", "gshard_random2", "topk_softmax"])
def test_stochastic_routers_do_draw_noise_in_training(router):
    """Guards the test above from passing because no noise is drawn at all."""
    cfg = build_config(router, "dropless", "swiglu", jitter_eps=0.3 if router == "topk_softmax" else 0.0)
    layer = MoELayer(cfg).double().train()
    x, token_ids = layer_inputs(layer, (4, 8), torch.float64)
    with torch.no_grad():
        torch.manual_seed(1)
        r1 = layer.router(x.reshape(-1, 8), token_ids.reshape(-1))
        torch.manual_seed(2)
        r2 = layer.router(x.reshape(-1, 8), token_ids.reshape(-1))
    assert not torch.equal(r1.weights_TK, r2.weights_TK)


@pytest.mark.parametrize("impl", ["cpu", "loop"])
@pytest.mark.parametrize("dispatch", DISPATCHERS.names())
@pytest.mark.parametrize("expert", ACTIVATIONS.names())
def test_one_expert_top1_is_the_dense_ffn(expert, dispatch, impl):
    cfg = MoEConfig(d_model=8, num_experts=1, top_k=1, d_ff=6, expert=expert, dispatch=dispatch,
                    experts_impl=impl, capacity_factor=1.0, init_std=0.5)
    layer = MoELayer(cfg).double()
    dense = DenseFFN(8, 6, expert).double()
    with torch.no_grad():
        dense.w_in.copy_(layer.experts.w_in[0])
        dense.w_out.copy_(layer.experts.w_out[0])
    x = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    y_ref = dense(x)
    torch.testing.assert_close(out.y, y_ref, atol=1e-12, rtol=1e-12)
    assert out.stats.drop_fraction == 0
    g, g_ref = torch.autograd.grad(out.y.square().sum(), x)[0], torch.autograd.grad(y_ref.square().sum(), x)[0]
    torch.testing.assert_close(g, g_ref, atol=1e-12, rtol=1e-12)


def functional_layer(layer: MoELayer, token_ids):
    """(x, *params) -> y, so gradcheck perturbs the input and every weight."""
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in layer.named_parameters())

    def f(x, *ps):
        return functional_call(layer, dict(zip(names, ps, strict=True)), (x,), {"token_ids": token_ids}).y

    return f, params


@pytest.mark.parametrize("dispatch", DISPATCHERS.names())
@pytest.mark.parametrize("router", ROUTERS.names())
def test_gradcheck_small_fp64_layer(router, dispatch):
    cfg = build_config(router, dispatch, "swiglu", d_model=4, num_experts=4, d_ff=3, shared_d_ff=2,
                       capacity_factor=0.6, init_std=1.0)
    layer = MoELayer(cfg).double().eval()
    x, token_ids = layer_inputs(layer, (1, 5), torch.float64, seed=3)
    if dispatch == "capacity" and router == "topk_softmax":
        assert layer(x, token_ids=token_ids).stats.drop_fraction > 0  # the drop path is exercised
    f, params = functional_layer(layer, token_ids)
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_gradcheck_capacity_slow_mode_default_router():
    """Full (not fast-mode) Jacobian check of the capacity path with drops."""
    cfg = build_config("topk_softmax", "capacity", "geglu", d_model=3, num_experts=3, d_ff=2,
                       shared_d_ff=2, capacity_factor=0.5, init_std=1.0)
    layer = MoELayer(cfg).double()
    x, token_ids = layer_inputs(layer, (1, 4), torch.float64, seed=5)
    assert layer(x).stats.drop_fraction > 0
    f, params = functional_layer(layer, token_ids)
    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("impl", ["cpu", "loop"])
def test_backward_twice_with_retain_graph(impl):
    """The fused Function keeps what backward needs in saved tensors, so a retained graph
    can be differentiated again (gradcheck and double backward through a loss need it)."""
    cfg = build_config("topk_softmax", "dropless", "swiglu", experts_impl=impl)
    layer = MoELayer(cfg).double()
    x, _ = layer_inputs(layer, (2, 5), torch.float64)
    y = layer(x).y
    y.square().sum().backward(retain_graph=True)
    first = layer.experts.w_in.grad.clone()
    y.square().sum().backward()
    torch.testing.assert_close(layer.experts.w_in.grad, 2 * first, atol=1e-12, rtol=1e-12)

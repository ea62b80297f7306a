"""The fused RoPE + causal attention kernel (ops/attention.py, ops/csrc/attention.cpp)
against its reference (RoPE, then torch's SDPA) run in float64: output and the gradients
of q, k and v, over head dims, GQA groupings, lengths that are not multiples of the
kernel's tiles, with and without rotation or causality; bit-identical results for 1 and
2 threads; where it refuses to run; and the attention module with and without it."""

from __future__ import annotations

import pytest
import torch

from moekit import settings
from moekit.models import MoELM, get_preset
from moekit.models.rope import RotaryEmbedding
from moekit.ops import attention, ext

pytestmark = pytest.mark.skipif(not ext.available(), reason="needs the C++ kernels")


def _inputs(B, H, G, S, d, seed=0):
    """q, k, v as the module makes them: (B, S, heads, d) memory viewed as (B, heads, S, d)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, d, generator=g).transpose(1, 2)
    k = torch.randn(B, S, G, d, generator=g).transpose(1, 2)
    v = torch.randn(B, S, G, d, generator=g).transpose(1, 2)
    return q, k, v


def _tables(d, S, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    r = RotaryEmbedding(d, 512, 10000.0)(0, S)
    return r.cos_SH.to(dtype), r.sin_SH.to(dtype)


def _grads(fn, q, k, v, do):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    y = fn(*leaves)
    return (y.detach(), *torch.autograd.grad(y, leaves, do))


@pytest.mark.parametrize("B,H,G,S,d", [(2, 4, 4, 37, 32), (1, 8, 2, 130, 64), (3, 2, 1, 9, 16),
                                       (1, 2, 2, 1, 32), (1, 4, 4, 300, 128), (2, 6, 3, 64, 48)])
@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_matches_fp64_reference(B, H, G, S, d, rope, causal):
    q, k, v = _inputs(B, H, G, S, d)
    do = torch.randn(B, H, S, d, generator=torch.Generator().manual_seed(1))
    tables = _tables(d, S) if rope else (None, None)
    assert attention.applies(q, k, 0.0)
    got = _grads(lambda *t: attention.kernel(*t, *tables, causal), q, k, v, do)
    ref64 = _tables(d, S, torch.float64) if rope else (None, None)
    want = _grads(lambda *t: attention.reference(*t, *ref64, causal), q.double(), k.double(), v.double(),
                  do.double())
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        err = (a.double() - b).abs().max().item()
        assert err <= 2e-5 * max(1.0, b.abs().max().item()), f"{name}: max error {err}"


@pytest.mark.parametrize("B,H,G,S,d", [(2, 4, 4, 37, 32), (1, 8, 2, 130, 64), (3, 2, 1, 9, 16)])
def test_fused_qkv_matches_fp64_reference(B, H, G, S, d):
    """attend_qkv on one (B, S, (H + 2G)·d) projection output: output (B, S, H·d) and the
    one gradient it writes for q, k and v together, against the reference on the split."""
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(B, S, (H + 2 * G) * d, generator=gen)
    do = torch.randn(B, S, H * d, generator=gen)
    cos, sin = _tables(d, S)
    leaf = qkv.clone().requires_grad_()
    y = attention.attend_qkv(leaf, H, G, cos, sin)
    (dqkv,) = torch.autograd.grad(y, leaf, do)
    assert y.shape == (B, S, H * d) and dqkv.is_contiguous()
    leaf64 = qkv.double().requires_grad_()
    q, k, v = attention.split_qkv(leaf64, H, G)
    y64 = attention.reference(q, k, v, *_tables(d, S, torch.float64)).transpose(1, 2).reshape(B, S, H * d)
    (dqkv64,) = torch.autograd.grad(y64, leaf64, do.double())
    for name, a, b in (("out", y, y64), ("dqkv", dqkv, dqkv64)):
        err = (a.double() - b).abs().max().item()
        assert err <= 2e-5 * max(1.0, b.abs().max().item()), f"{name}: max error {err}"


def test_output_and_gradients_keep_the_projection_layout():
    """The output lies in (B, S, H, d) memory (the output projection reads it without a
    copy) and each gradient has the strides of its input."""
    q, k, v = _inputs(2, 4, 2, 20, 32)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    y = attention.attend(*leaves, *_tables(32, 20))
    assert y.transpose(1, 2).is_contiguous()
    y.backward(torch.randn_like(y))
    for t in leaves:
        assert t.grad.stride() == t.stride()


def test_result_does_not_depend_on_thread_count():
    q, k, v = _inputs(3, 4, 2, 77, 32, seed=3)
    do = torch.randn(3, 4, 77, 32)
    fn = lambda *t: attention.attend(*t, *_tables(32, 77))  # noqa: E731
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _grads(fn, q, k, v, do)
        torch.set_num_threads(2)
        two = _grads(fn, q, k, v, do)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


def test_refuses_what_it_cannot_compute():
    q, k, _ = _inputs(1, 4, 4, 16, 32)
    assert attention.applies(q, k, 0.0)
    assert not attention.applies(q, k, 0.1)  # dropout
    assert not attention.applies(q.double(), k.double(), 0.0)
    assert not attention.applies(q[..., :24], k[..., :24], 0.0)  # head dim not a multiple of 16
    assert not attention.applies(q[:, :, :4], k, 0.0)  # queries after cached keys
    long_q, long_k, _ = _inputs(1, 1, 1, attention.MAX_LEN + 1, 16)
    assert not attention.applies(long_q, long_k, 0.0)
    assert not attention.applies(q, k[:, :3], 0.0)  # 4 query heads over 3 kv heads


def test_kernel_rejects_bad_inputs():
    q, k, v = _inputs(1, 4, 4, 16, 32)
    o, lse = torch.empty_like(q), torch.empty(1, 4, 16)
    empty = torch.empty(0)
    op = ext.op("attention_fwd")
    with pytest.raises(RuntimeError, match="head dim"):
        op(q[..., :24], k[..., :24], v[..., :24], empty, empty, empty, empty, o[..., :24], lse, 1.0, 0, True)
    with pytest.raises(RuntimeError, match="multiple of kv heads"):
        op(q, k[:, :3], v[:, :3], empty, empty, empty, empty, o, lse, 1.0, 0, True)
    with pytest.raises(RuntimeError, match="causal offset"):
        op(q, k, v, empty, empty, empty, empty, o, lse, 1.0, 3, True)
    with pytest.raises(RuntimeError, match="rope tables"):
        bad = torch.ones(15, 32)
        op(q, k, v, bad, bad, bad, bad, o, lse, 1.0, 0, True)
    with pytest.raises(RuntimeError, match="float32"):
        op(q.double(), k.double(), v.double(), empty, empty, empty, empty, o, lse, 1.0, 0, True)


def _attention_block(preset: str, kernel: bool):
    """A one-layer model's attention block, built with the kernel allowed or not."""
    torch.manual_seed(0)
    with settings.use(attention_kernel=kernel):
        model = MoELM(get_preset(preset, 260).replace(n_layers=1))
    return model.layers[0].attn, model


@pytest.mark.parametrize("preset", ["tiny", "mixtral-like"])
def test_model_attention_same_with_and_without_kernel(preset):
    """A model's attention block: the kernel path against the RoPE + SDPA path (GQA in
    mixtral-like), outputs and every parameter gradient. Whether the kernel serves the
    block is decided when it is built (settings.attention_kernel, the head dim)."""
    on, model = _attention_block(preset, True)
    off, _ = _attention_block(preset, False)
    assert on.kernel and not off.kernel
    off.load_state_dict(on.state_dict())
    x = torch.randn(2, 50, model.cfg.d_model)
    rope = model.rope(0, 50)

    def run(attn):
        for p in attn.parameters():
            p.grad = None
        y = attn(x, rope)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
        return y.detach(), [p.grad.clone() for p in attn.parameters()]

    y1, g1 = run(on)
    y0, g0 = run(off)
    torch.testing.assert_close(y1, y0, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g0, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_a_wrapped_or_hooked_projection_is_used_by_the_kernel_path():
    """q, k, v come from one projection module, qkv_proj, on every path: an adapter that
    replaces it (e.g. a LoRA wrapper) or a hook on it takes effect with the kernel too."""
    on, model = _attention_block("tiny", True)
    off, _ = _attention_block("tiny", False)
    off.load_state_dict(on.state_dict())
    x = torch.randn(2, 20, model.cfg.d_model)
    rope = model.rope(0, 20)
    base = on(x, rope)

    class Shifted(torch.nn.Module):  # stands in for an adapter around qkv_proj
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, t):
            return self.inner(t) + 0.5

    on.qkv_proj, off.qkv_proj = Shifted(on.qkv_proj), Shifted(off.qkv_proj)
    shifted = on(x, rope)
    assert not torch.allclose(shifted, base)
    torch.testing.assert_close(shifted, off(x, rope), atol=1e-5, rtol=1e-5)
    on.qkv_proj = on.qkv_proj.inner
    seen = []
    handle = on.qkv_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    on(x, rope)
    handle.remove()
    assert seen == [(2, 20, on.qkv_proj.out_features)]


def test_the_state_dict_keeps_the_three_projection_names():
    """q_proj.weight, k_proj.weight, v_proj.weight as in HF checkpoints and earlier runs:
    split on save, joined on load, values unchanged."""
    attn, _ = _attention_block("mixtral-like", True)
    sd = attn.state_dict()
    assert {"q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"} == set(sd)
    H, G, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    assert sd["q_proj.weight"].shape[0] == H * d and sd["k_proj.weight"].shape[0] == G * d
    assert torch.equal(torch.cat([sd["q_proj.weight"], sd["k_proj.weight"], sd["v_proj.weight"]]),
                       attn.qkv_proj.weight)
    other, _ = _attention_block("mixtral-like", False)
    other.load_state_dict({k: v + 1 for k, v in sd.items()})
    assert torch.equal(other.qkv_proj.weight, attn.qkv_proj.weight + 1)

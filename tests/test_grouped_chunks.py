"""The chunk loop walks expert-sorted rows in chunks (moe/experts/cpu/chunked.py). At the
default sizes the small test layers fit in one chunk, so here the chunks are made small
through the path value (CpuPath.chunk_rows): experts are split across chunks and chunks
hold several experts, and the result must still equal the loop oracle (outputs and
every gradient, fp64)."""

from __future__ import annotations

import pytest
import torch

from moekit import MoEConfig, MoELayer, settings
from moekit.moe.experts import ACTIVATIONS
from moekit.moe.experts.cpu.chunked import _padded_rows
from moekit.moe.experts.cpu.chunks import plan_chunks
from moekit.ops import gemm


@pytest.mark.parametrize("counts,max_rows", [([3, 0, 5, 1], 2), ([7], 3), ([0, 0], 4), ([1, 1, 1], 8)])
def test_plan_chunks_covers_every_row_once(counts, max_rows):
    chunks = plan_chunks(counts, max_rows)
    seen = []
    for r0, r1, segs in chunks:
        assert 0 < r1 - r0 <= max_rows
        assert segs[0][1] == 0 and segs[-1][2] == r1 - r0  # segments tile the chunk
        for (e, s, t), nxt in zip(segs, segs[1:] + [None], strict=True):
            assert t > s and (nxt is None or nxt[1] == t)
            seen += [e] * (t - s)
    assert seen == [e for e, c in enumerate(counts) for _ in range(c)]


def _chunks_of(layer: MoELayer, x: torch.Tensor, rows: int, one_expert: bool = False):
    """The chunks the loop walks for this layer's routing of x."""
    with torch.no_grad():
        plan = layer.dispatch(layer.router(x.reshape(-1, x.shape[-1])), layer.cfg)
    return plan_chunks(plan.counts_E.tolist(), rows, one_expert=one_expert)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
@pytest.mark.parametrize("expert", ACTIVATIONS.names())
def test_many_small_chunks_match_the_loop_oracle(expert, dispatch):
    cfg = MoEConfig(d_model=16, num_experts=4, top_k=2, d_ff=8, expert=expert, dispatch=dispatch,
                    capacity_factor=1.0, num_shared_experts=1, init_std=0.5)
    torch.manual_seed(0)
    fast = MoELayer(cfg).double()
    ref = MoELayer(cfg.replace(experts_impl="loop")).double()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(3, 11, 16, dtype=torch.float64)
    results = []
    for layer in (fast, ref):
        xi = x.clone().requires_grad_()
        with settings.use(cpu_path={"kernel": "chunked", "products": "torch", "chunk_rows": 7}):
            out = layer(xi)
        probe = torch.linspace(-1, 1, out.y.numel(), dtype=torch.float64).view_as(out.y)
        ((out.y * probe).sum() + out.aux_loss).backward()
        results.append((out.y, xi.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (y_a, gx_a, g_a), (y_b, gx_b, g_b) = results
    assert fast.experts.cpu_state.last_path.chunk_rows == 7
    chunks = _chunks_of(fast, x, 7)
    assert len(chunks) >= 4, "the forward must walk several chunks"
    experts_per_chunk = [{e for e, _, _ in segs} for _, _, segs in chunks]
    assert any(len(s) > 1 for s in experts_per_chunk), "some chunk must hold several experts"
    split = [e for e in range(4) if sum(e in s for s in experts_per_chunk) > 1]
    assert split, "some expert must be split across chunks"
    torch.testing.assert_close(y_a, y_b, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gx_a, gx_b, atol=1e-12, rtol=1e-12)
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], atol=1e-12, rtol=1e-12, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("counts,max_rows", [([3, 0, 5, 1], 4), ([7], 3), ([2, 2], 8)])
def test_one_expert_chunks_never_mix_experts(counts, max_rows):
    chunks = plan_chunks(counts, max_rows, one_expert=True)
    assert all(len(segs) == 1 for _, _, segs in chunks)
    assert [e for _, _, segs in chunks for e, s, t in segs for _ in range(t - s)] == \
        [e for e, c in enumerate(counts) for _ in range(c)]


@pytest.mark.parametrize("expert", ACTIVATIONS.names())
def test_padded_path_matches_the_loop_oracle(expert):
    """fp32 on oneDNN: one expert per chunk, rows padded with zeros to a multiple of
    gemm.SHAPE_STEP (experts split across chunks too), so every product oneDNN sees has a
    row count that is a multiple of SHAPE_STEP or below it; results equal the oracle's."""
    if not gemm.onednn_takes(torch.empty(0)):
        pytest.skip("torch built without oneDNN")
    cfg = MoEConfig(d_model=80, num_experts=4, top_k=2, d_ff=72, expert=expert, init_std=0.2)
    torch.manual_seed(0)
    fast = MoELayer(cfg)
    ref = MoELayer(cfg.replace(experts_impl="loop")).double()  # the oracle in fp64
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(3, 200, 80)
    results = []
    path = {"kernel": "chunked", "products": "onednn", "pad": gemm.SHAPE_STEP, "chunk_rows": 128}
    for layer in (fast, ref):
        xi = x.to(layer.router.weight.dtype).detach().clone().requires_grad_()
        with settings.use(cpu_path=path):
            out = layer(xi)
        probe = torch.linspace(-1, 1, out.y.numel(), dtype=out.y.dtype).view_as(out.y)
        (out.y * probe).sum().backward()
        results.append([out.y, xi.grad] + [p.grad for p in layer.parameters()])
    assert fast.experts.cpu_state.last_path.products == "onednn"
    chunks = _chunks_of(fast, x, 128, one_expert=True)
    assert all(len(segs) == 1 for _, _, segs in chunks)
    assert len(chunks) > cfg.num_experts, "some expert must be split across chunks"
    step = gemm.SHAPE_STEP
    for r0, r1, _ in chunks:
        m = _padded_rows(r1 - r0, step)
        assert m % step == 0 or m < step, (r0, r1, m)
    for got, want in zip(*results, strict=True):  # fp32 rounding, relative to each tensor's scale
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()

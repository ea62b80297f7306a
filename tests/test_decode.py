"""The decode path: ops/rowmv.py's compiled mat-vec kernel against its torch reference,
and the grouped backend's decode branch against the chunked GEMM path and the loop
oracle."""

from __future__ import annotations

import shutil

import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.moe import decode_step
from moekit.moe.experts import decode, grouped
from moekit.ops import ext, gemm, rowmv

F32 = dict(atol=1e-5, rtol=1e-5)
needs_kernel = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")


@needs_kernel
def test_kernel_builds_where_a_compiler_exists():
    """Otherwise every test below would quietly check the reference against itself."""
    assert rowmv.applies(torch.zeros(1, 4), torch.zeros(1, 2, 4))


@needs_kernel
@pytest.mark.parametrize("counts", [[1, 0, 2, 0], [0, 0, 0, 5], [3, 1, 4, 1], [0, 0, 0, 0], [9, 0, 6, 2]])
@pytest.mark.parametrize("K", [7, 32, 100])
def test_kernel_matches_reference(counts, K):
    g = torch.Generator().manual_seed(K)
    R = sum(counts)
    a = torch.randn(R, K, generator=g)
    w = torch.randn(len(counts), 37, K, generator=g)
    off = torch.tensor([0, *counts]).cumsum(0)
    got = rowmv.grouped_rows_linear(a, w, off)
    ref = (a.double()[:, None, :] * w.double()[torch.repeat_interleave(torch.arange(4), torch.tensor(counts))]).sum(-1)
    assert got.shape == (R, 37)
    torch.testing.assert_close(got.double(), ref, **F32)
    torch.testing.assert_close(got, rowmv.reference(a, w, off), **F32)


@needs_kernel
def test_kernel_strided_weight_rows_and_bad_offsets():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 16, 40, generator=g)[:, ::2, :24]  # rows contiguous, strides not
    a = torch.randn(4, 24, generator=g)
    off = torch.tensor([0, 1, 1, 4])
    torch.testing.assert_close(rowmv.grouped_rows_linear(a, w, off), rowmv.reference(a, w, off), **F32)
    with pytest.raises(RuntimeError, match="offsets must run from 0 to R = 4"):
        rowmv.grouped_rows_linear(a, w, torch.tensor([0, 1, 1, 3]))
    with pytest.raises(RuntimeError, match="offsets must not decrease"):
        rowmv.grouped_rows_linear(a, w, torch.tensor([0, 3, 1, 4]))


def test_reference_runs_where_the_kernel_does_not(monkeypatch):
    """fp64, a gradient to keep, or no build: the torch reference, same numbers."""
    monkeypatch.setitem(ext._state, "built", False)
    a = torch.randn(3, 8, dtype=torch.float64)
    w = torch.randn(2, 5, 8, dtype=torch.float64)
    off = torch.tensor([0, 2, 3])
    assert not rowmv.applies(a.float(), w.float())
    got = rowmv.grouped_rows_linear(a, w, off)
    torch.testing.assert_close(got, torch.cat([a[:2] @ w[0].T, a[2:] @ w[1].T]))


def _layer(expert: str, backend: str, top_k: int = 2) -> MoELayer:
    cfg = MoEConfig(d_model=48, num_experts=8, top_k=top_k, d_ff=40, expert=expert,
                    expert_backend=backend, num_shared_experts=1, shared_d_ff=24, init_std=0.3)
    torch.manual_seed(0)
    return MoELayer(cfg).eval()


@needs_kernel
@pytest.mark.parametrize("expert", ["swiglu", "geglu", "gelu", "relu"])
@pytest.mark.parametrize("T", [1, 3, 8])
def test_decode_branch_matches_chunked_path_and_oracle(monkeypatch, expert, T):
    fast, oracle = _layer(expert, "grouped"), _layer(expert, "loop")
    oracle.load_state_dict(fast.state_dict())
    x = torch.randn(1, T, 48, generator=torch.Generator().manual_seed(T))
    taken = []
    real = decode.decode_experts
    monkeypatch.setattr(decode, "decode_experts", lambda *a: taken.append(1) or real(*a))
    monkeypatch.setattr(decode, "fused_step", lambda *a: None)  # the fused kernels: tested below
    monkeypatch.setattr(decode_step, "_kernel_args", lambda *a: None)
    with torch.no_grad():
        y_decode = fast(x).y
        with gemm.backend("torch"):
            y_oracle = oracle(x).y
        monkeypatch.setattr(decode, "DECODE_MAX_ROWS", -1)  # forces the chunked GEMM path
        y_chunked = fast(x).y
    assert taken == [1]
    torch.testing.assert_close(y_decode, y_oracle, **F32)
    torch.testing.assert_close(y_decode, y_chunked, **F32)


def test_decode_branch_not_taken_for_training_or_many_rows(monkeypatch):
    taken = []
    monkeypatch.setattr(decode, "decode_experts", lambda *a: taken.append(1))
    layer = _layer("swiglu", "grouped")
    layer(torch.randn(1, 2, 48)).y.sum().backward()  # a gradient is needed
    with torch.no_grad():
        layer(torch.randn(4, 64, 48))  # 512 rows on 8 experts: GEMMs
    assert taken == []
    assert grouped.MIN_ROWS > decode.DECODE_MAX_ROWS


@needs_kernel
@pytest.mark.parametrize("M", [1, 4])
def test_gemm_linear_uses_the_kernel_for_decode_rows(monkeypatch, M):
    calls = []
    real = rowmv.grouped_rows_linear
    monkeypatch.setattr(rowmv, "grouped_rows_linear", lambda *a: calls.append(1) or real(*a))
    a, w, b = torch.randn(M, 256) * 0.25, torch.randn(300, 256) * 0.25, torch.randn(300)
    with torch.no_grad():
        y = gemm.linear(a, w, b)
        gemm.linear(torch.randn(5, 256), w)  # 5 rows: GEMM kernels
    assert calls == [1]
    torch.testing.assert_close(y, torch.nn.functional.linear(a, w, b), **F32)


def test_routing_stats_are_computed_when_read_and_once(monkeypatch):
    """A decode step that never reads its stats pays nothing for them."""
    from moekit.moe import types as stats_mod

    calls = []
    real = stats_mod._entropy
    monkeypatch.setattr(stats_mod, "_entropy", lambda p: calls.append(1) or real(p))
    layer = _layer("swiglu", "grouped")
    with torch.no_grad():
        out = layer(torch.randn(1, 3, 48))
    assert calls == []
    first = out.stats.router_entropy
    assert calls == [1] and out.stats.router_entropy is first
    assert 0 < float(first) <= torch.log(torch.tensor(8.0)) + 1e-6
    with pytest.raises(AttributeError, match="no field 'entropy'"):
        out.stats.entropy  # noqa: B018


def _fused_layer(num_shared: int, gate: bool, top_k: int = 2, **kw) -> MoELayer:
    cfg = MoEConfig(d_model=48, num_experts=8, top_k=top_k, d_ff=40, num_shared_experts=num_shared,
                    shared_d_ff=24 if num_shared else None, shared_gate=gate, init_std=0.3, **kw)
    torch.manual_seed(1)
    return MoELayer(cfg).eval()


def _spy_fused(monkeypatch) -> list:
    """Records whether fused_step ran its kernel (returned a tensor) on each call; the
    whole-layer step (decode_step, which would take these layers first) is off."""
    monkeypatch.setattr(decode_step, "_kernel_args", lambda *a: None)
    taken = []
    real = decode.fused_step
    monkeypatch.setattr(decode, "fused_step", lambda *a: taken.append((y := real(*a)) is not None) or y)
    return taken


@needs_kernel
@pytest.mark.parametrize("shared,gate", [(0, False), (1, False), (1, True), (2, False)])
@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("top_k", [1, 2, 8])
def test_fused_step_matches_stage_by_stage_and_oracle(monkeypatch, shared, gate, T, top_k):
    """The whole-step kernel (routed experts, combine, shared expert and its gate) equals
    the unfused modules and the loop oracle on torch's GEMMs; experts without rows, rows
    of one token on several experts and all experts busy (top_k = E) included."""
    fast = _fused_layer(shared, gate, top_k)
    oracle = _fused_layer(shared, gate, top_k, expert_backend="loop")
    oracle.load_state_dict(fast.state_dict())
    x = torch.randn(1, T, 48, generator=torch.Generator().manual_seed(10 * T + top_k))
    taken = _spy_fused(monkeypatch)
    with torch.no_grad():
        y = fast(x).y
        routing = fast.router(x.reshape(T, 48))
        plan = fast.dispatch(routing, fast.cfg)
        y_ref = decode.fused_reference(x.reshape(T, 48), plan, fast.experts, fast.shared)
        with gemm.backend("torch"):
            y_oracle = oracle(x).y
    assert taken == [True, False]  # the loop oracle goes stage by stage
    torch.testing.assert_close(y.reshape(T, 48), y_ref, **F32)
    torch.testing.assert_close(y, y_oracle, **F32)


@needs_kernel
def test_fused_step_takes_strided_inputs():
    layer = _fused_layer(1, True)
    x = torch.randn(3, 96)[:, ::2]  # rows not contiguous
    with torch.no_grad():
        plan = layer.dispatch(layer.router(x), layer.cfg)
        got = decode.fused_step(x, plan, layer.experts, layer.shared)
        ref = decode.fused_reference(x, plan, layer.experts, layer.shared)
    torch.testing.assert_close(got, ref, **F32)


def test_fused_step_declines_what_it_does_not_cover(monkeypatch):
    """A gradient to keep, more than FUSED_MAX_TOKENS tokens, another activation, the loop
    backend, fp64, the PR-MoE residual: the stage-by-stage path, same results."""
    taken = _spy_fused(monkeypatch)
    layer = _fused_layer(1, False)
    layer(torch.randn(1, 2, 48)).y.sum().backward()  # gradients needed
    with torch.no_grad():
        layer(torch.randn(1, decode.FUSED_MAX_TOKENS + 1, 48))
        _fused_layer(1, False, expert="geglu")(torch.randn(1, 2, 48))
        _fused_layer(0, False, expert_backend="loop")(torch.randn(1, 2, 48))
        _fused_layer(1, True).double()(torch.randn(1, 2, 48, dtype=torch.float64))
    assert taken == [False] * 5
    with torch.no_grad():
        _fused_layer(0, False, residual_d_ff=16)(torch.randn(1, 2, 48))
    assert len(taken) == 5  # the residual mix never asks


@needs_kernel
def test_fused_kernel_rejects_inconsistent_plans():
    layer = _fused_layer(1, False)
    x = torch.randn(2, 48)
    op = ext.op("moe_decode_swiglu")
    w_in, w_out = layer.experts.w_in.detach(), layer.experts.w_out.detach()
    tok, wts = torch.tensor([0, 1]), torch.ones(2)
    with pytest.raises(RuntimeError, match="counts sum to 3, not R = 2"):
        op(x, tok, wts, torch.tensor([1, 2, 0, 0, 0, 0, 0, 0]), w_in, w_out, None, None, None)
    with pytest.raises(RuntimeError, match="token index out of range"):
        op(x, torch.tensor([0, 2]), wts, torch.tensor([1, 1, 0, 0, 0, 0, 0, 0]), w_in, w_out, None, None, None)
    with pytest.raises(RuntimeError, match="give both s_in and s_out"):
        op(x, tok, wts, torch.tensor([1, 1, 0, 0, 0, 0, 0, 0]), w_in, w_out, layer.shared.ffn.w_in.detach(), None, None)


def _staged(layer: MoELayer, x_TD: torch.Tensor):
    """The layer's stage-by-stage path, which decode_step must reproduce."""
    routing = layer.router(x_TD)
    plan = layer.dispatch(routing, layer.cfg)
    return layer._dense_paths(x_TD, layer.experts(x_TD, plan)), routing, plan


def _assert_same_step(got, staged, T: int) -> None:
    """y, the Routing (ids, weights, logits, probs) and the DispatchPlan (rows, slots,
    weights, counts) of decode_step equal the staged path's."""
    assert got is not None
    (y, r, p), (y_ref, r_ref, p_ref) = got, staged
    torch.testing.assert_close(y, y_ref, **F32)
    assert torch.equal(r.expert_ids_TK, r_ref.expert_ids_TK)
    for name in ("weights_TK", "logits_TE", "probs_TE"):
        torch.testing.assert_close(getattr(r, name), getattr(r_ref, name), **F32)
    for name in ("token_idx_R", "slot_idx_R", "counts_E", "requested_E"):
        assert torch.equal(getattr(p, name), getattr(p_ref, name)), name
    torch.testing.assert_close(p.weights_R, p_ref.weights_R, **F32)
    assert p.num_tokens == T


@needs_kernel
@pytest.mark.parametrize("order,normalize", [("before", True), ("before", False), ("after", True)])
@pytest.mark.parametrize("shared,gate", [(0, False), (1, True), (2, False)])
@pytest.mark.parametrize("T,top_k", [(1, 1), (1, 2), (3, 2), (8, 2), (5, 8)])
def test_whole_layer_step_matches_the_stages(order, normalize, shared, gate, T, top_k):
    """moe/decode_step.py's one-kernel step: y, the Routing (ids, weights, logits, probs)
    and the DispatchPlan (rows, slots, weights, counts) equal the staged path's."""
    layer = _fused_layer(shared, gate, top_k, softmax_order=order, normalize_topk=normalize,
                         router_bias=True)
    with torch.no_grad():
        layer.router.bias.normal_(0, 0.3)
        x_TD = torch.randn(T, 48, generator=torch.Generator().manual_seed(T * 10 + top_k))
        got = decode_step.fused_layer(layer, x_TD)
        y_ref, r_ref, p_ref = _staged(layer, x_TD)
    _assert_same_step(got, (y_ref, r_ref, p_ref), T)


@needs_kernel
@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2), (2, 1)])
@pytest.mark.parametrize("normalize,scale", [(True, 2.5), (False, 1.0)])
@pytest.mark.parametrize("T,top_k", [(1, 2), (4, 3), (8, 1)])
def test_whole_layer_step_matches_the_stages_sigmoid(n_group, topk_group, normalize, scale, T, top_k):
    """The DeepSeek-V3 router in the one-kernel step: sigmoid scores, a selection bias that
    stays out of the weights, group-limited selection, normalisation and scaling."""
    layer = _fused_layer(1, False, top_k, router="topk_sigmoid", n_group=n_group, topk_group=topk_group,
                         normalize_topk=normalize, routed_scaling_factor=scale)
    with torch.no_grad():
        layer.router.expert_bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
        x_TD = torch.randn(T, 48, generator=torch.Generator().manual_seed(T))
        got = decode_step.fused_layer(layer, x_TD)
        y_ref, r_ref, p_ref = _staged(layer, x_TD)
    _assert_same_step(got, (y_ref, r_ref, p_ref), T)


@needs_kernel
def test_layer_forward_takes_the_whole_step_and_reports_the_same(monkeypatch):
    """Through MoELayer.forward: the same y, aux loss and stats as the stages, and the
    step is taken only at inference (eval, no gradient, few tokens)."""
    taken = []
    real = decode_step.fused_layer
    monkeypatch.setattr(decode_step, "fused_layer", lambda *a: taken.append((o := real(*a)) is not None) or o)
    layer = _fused_layer(1, True, aux_loss_coef=0.01, z_loss_coef=0.001)
    x = torch.randn(2, 3, 48)
    with torch.no_grad():
        fast = layer(x)
        monkeypatch.setattr(decode_step, "_kernel_args", lambda *a: None)
        slow = layer(x)
    assert taken == [True, False]
    torch.testing.assert_close(fast.y, slow.y, **F32)
    torch.testing.assert_close(fast.aux_loss, slow.aux_loss, **F32)
    assert torch.equal(fast.stats.tokens_per_expert, slow.stats.tokens_per_expert)
    torch.testing.assert_close(fast.stats.router_entropy, slow.stats.router_entropy, **F32)


@needs_kernel
def test_whole_layer_step_declines_what_it_does_not_cover():
    x = torch.randn(2, 48)
    layer = _fused_layer(1, False)
    with torch.no_grad():
        assert decode_step.fused_layer(layer, x) is not None
        assert decode_step.fused_layer(layer.train(), x) is not None  # no random draws: the same step
        assert decode_step.fused_layer(_fused_layer(1, False, jitter_eps=0.1).train(), x) is None
        assert decode_step.fused_layer(_fused_layer(1, False, expert_dropout=0.1).train(), x) is None
        assert decode_step.fused_layer(_fused_layer(1, False, jitter_eps=0.1).eval(), x) is not None
        layer.eval()
        assert decode_step.fused_layer(layer, torch.randn(decode.FUSED_MAX_TOKENS + 1, 48)) is None
        for kw in (dict(router="expert_choice"), dict(dispatch="capacity"), dict(expert="gelu"),
                   dict(expert_backend="loop"), dict(residual_d_ff=16), dict(router="noisy_topk")):
            assert decode_step.fused_layer(_fused_layer(1, False, **kw), x) is None, kw
        assert decode_step.fused_layer(_fused_layer(1, False).double(), x.double()) is None
    assert decode_step.fused_layer(layer, x) is None  # gradients enabled on trainable weights

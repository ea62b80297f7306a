"""Decoding: ops/rowmv.py's compiled mat-vec kernel against its torch reference; the CPU
wing's decode path against the chunk loop and the loop oracle; the fused decode steps
(ops/decode_ffn.py, swapped in by inference/fused_decode.py) against the staged layer."""

from __future__ import annotations

import pytest
import torch

from moekit import MoEConfig, MoELayer, settings
from moekit.inference import prepare_for_inference, restore
from moekit.inference.fused_decode import FUSED_MAX_TOKENS, FusedDecodeLayer, fusion_for
from moekit.moe.experts import ACTIVATIONS
from moekit.moe.experts.cpu import CpuPath, cpu_experts
from moekit.moe.experts.cpu.path import DECODE_MAX_ROWS, MIN_ROWS
from moekit.moe.experts.loop import loop_experts
from moekit.ops import decode_ffn, ext, gemm, rowmv

F32 = dict(atol=1e-5, rtol=1e-5)
needs_kernel = pytest.mark.skipif(not ext.available(), reason="needs the C++ kernels")


@needs_kernel
def test_the_kernel_applies_where_it_is_built():
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


def test_reference_runs_where_the_kernel_does_not():
    """fp64, a gradient to keep, or kernels off: the torch reference, same numbers."""
    a = torch.randn(3, 8, dtype=torch.float64)
    w = torch.randn(2, 5, 8, dtype=torch.float64)
    off = torch.tensor([0, 2, 3])
    assert not rowmv.applies(a, w)
    with settings.use(kernels="off"):
        assert not rowmv.applies(a.float(), w.float())
    got = rowmv.grouped_rows_linear(a, w, off)
    torch.testing.assert_close(got, torch.cat([a[:2] @ w[0].T, a[2:] @ w[1].T]))


def _layer(expert: str, impl: str = "auto", top_k: int = 2) -> MoELayer:
    cfg = MoEConfig(d_model=48, num_experts=8, top_k=top_k, d_ff=40, expert=expert,
                    experts_impl=impl, num_shared_experts=1, shared_d_ff=24, init_std=0.3)
    torch.manual_seed(0)
    return MoELayer(cfg).eval()


@needs_kernel
@pytest.mark.parametrize("expert", ["swiglu", "geglu", "gelu", "relu"])
@pytest.mark.parametrize("T", [1, 3, 8])
def test_decode_path_matches_the_chunk_loop_and_the_oracle(expert, T):
    layer = _layer(expert)
    x_TD = torch.randn(T, 48, generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        plan = layer.dispatch(layer.router(x_TD), layer.cfg)
        w_in, w_out, act = layer.experts.w_in, layer.experts.w_out, ACTIVATIONS.get(expert)
        y_decode = cpu_experts(x_TD, plan, w_in, w_out, act, path=CpuPath(kernel="decode"))
        y_chunked = cpu_experts(x_TD, plan, w_in, w_out, act, path=CpuPath(kernel="chunked", products="torch"))
        y_oracle = loop_experts(x_TD, plan, w_in, w_out, act)
    torch.testing.assert_close(y_decode, y_oracle, **F32)
    torch.testing.assert_close(y_decode, y_chunked, **F32)


def test_decode_path_is_taken_for_inference_steps_only():
    layer = _layer("swiglu")
    layer(torch.randn(1, 2, 48)).y.sum().backward()  # a gradient is needed
    paths = [layer.experts.cpu_state.last_path.kernel]
    with torch.no_grad():
        layer(torch.randn(4, 64, 48))  # 512 rows on 8 experts: GEMMs
        paths.append(layer.experts.cpu_state.last_path.kernel)
        layer(torch.randn(1, 2, 48))
        paths.append(layer.experts.cpu_state.last_path.kernel)
    assert paths[0] != "decode" and paths[1] != "decode"
    assert paths[2] == ("decode" if ext.available() else "chunked")
    assert MIN_ROWS > DECODE_MAX_ROWS


@needs_kernel
@pytest.mark.parametrize("M", [1, 4])
def test_gemm_linear_takes_the_mat_vec_kernel_for_decode_rows(M):
    """Under fixed rules (the suite's settings) a few rows go to the mat-vec kernel; a
    measured machine may pick another kernel (ops/tune.py), with the same numbers."""
    a, w, b = torch.randn(M, 256) * 0.25, torch.randn(300, 256) * 0.25, torch.randn(300)
    with torch.no_grad():
        assert gemm.kernel_for(a, w, b) == "rowmv"
        assert gemm.kernel_for(torch.randn(5, 256), w) != "rowmv"  # 5 rows: GEMM kernels
        y = gemm.linear(a, w, b)
    torch.testing.assert_close(y, torch.nn.functional.linear(a, w, b), **F32)


def test_routing_stats_are_computed_when_read_and_once():
    """A decode step that never reads its stats pays nothing for them."""
    layer = _layer("swiglu")
    with torch.no_grad():
        out = layer(torch.randn(1, 3, 48))
    assert "router_entropy" not in vars(out.stats)
    first = out.stats.router_entropy
    assert "router_entropy" in vars(out.stats) and out.stats.router_entropy is first
    assert 0 < float(first) <= torch.log(torch.tensor(8.0)) + 1e-6
    with pytest.raises(AttributeError, match="no field 'entropy'"):
        out.stats.entropy  # noqa: B018


def _fused_layer(num_shared: int, gate: bool, top_k: int = 2, **kw) -> MoELayer:
    cfg = MoEConfig(d_model=48, num_experts=8, top_k=top_k, d_ff=40, num_shared_experts=num_shared,
                    shared_d_ff=24 if num_shared else None, shared_gate=gate, init_std=0.3, **kw)
    torch.manual_seed(1)
    return MoELayer(cfg).eval()


def _staged(layer: MoELayer, x_TD: torch.Tensor):
    """The layer's stage-by-stage path, which the fused steps must reproduce."""
    routing = layer.router(x_TD)
    plan = layer.dispatch(routing, layer.cfg)
    return layer.dense_paths(x_TD, layer.experts(x_TD, plan)), routing, plan


def _rows(plan) -> decode_ffn.DecodeRows:
    return decode_ffn.DecodeRows(plan.token_idx_R, plan.weights_R, plan.counts_E)


def _ffn(layer: MoELayer) -> decode_ffn.DecodeFFN:
    s = layer.shared
    if s is None:
        return decode_ffn.DecodeFFN(layer.experts.w_in, layer.experts.w_out)
    return decode_ffn.DecodeFFN(layer.experts.w_in, layer.experts.w_out, s.ffn.w_in, s.ffn.w_out,
                                None if s.gate is None else s.gate.weight.reshape(-1))


@needs_kernel
@pytest.mark.parametrize("shared,gate", [(0, False), (1, False), (1, True), (2, False)])
@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("top_k", [1, 2, 8])
def test_experts_step_matches_the_stages_its_reference_and_the_oracle(shared, gate, T, top_k):
    """The experts-and-shared step (routed experts, combine, shared expert and its gate)
    equals the staged modules, its torch reference, and the loop oracle; experts without
    rows, one token's rows on several experts and all experts busy (top_k = E) included."""
    fast = _fused_layer(shared, gate, top_k)
    oracle = _fused_layer(shared, gate, top_k, experts_impl="loop")
    oracle.load_state_dict(fast.state_dict())
    x_TD = torch.randn(T, 48, generator=torch.Generator().manual_seed(10 * T + top_k))
    with torch.no_grad():
        y_ref, _, plan = _staged(fast, x_TD)
        y = decode_ffn.experts_step(x_TD, _rows(plan), _ffn(fast))
        y_torch = decode_ffn.experts_step_reference(x_TD, _rows(plan), _ffn(fast))
        with settings.use(gemm="torch"):
            y_oracle = _staged(oracle, x_TD)[0]
    for want in (y_ref, y_torch, y_oracle):
        torch.testing.assert_close(y, want, **F32)


@needs_kernel
def test_experts_step_takes_strided_inputs():
    layer = _fused_layer(1, True)
    x = torch.randn(3, 96)[:, ::2]  # rows not contiguous
    with torch.no_grad():
        y_ref, _, plan = _staged(layer, x)
        got = decode_ffn.experts_step(x, _rows(plan), _ffn(layer))
    torch.testing.assert_close(got, y_ref, **F32)


@needs_kernel
def test_the_step_kernels_reject_inconsistent_plans():
    layer = _fused_layer(1, False)
    x = torch.randn(2, 48)
    ffn = decode_ffn.DecodeFFN(layer.experts.w_in.detach(), layer.experts.w_out.detach())
    tok, wts = torch.tensor([0, 1]), torch.ones(2)
    with pytest.raises(RuntimeError, match="counts sum to 3, not R = 2"):
        decode_ffn.experts_step(x, decode_ffn.DecodeRows(tok, wts, torch.tensor([1, 2, 0, 0, 0, 0, 0, 0])), ffn)
    with pytest.raises(RuntimeError, match="token index out of range"):
        decode_ffn.experts_step(x, decode_ffn.DecodeRows(torch.tensor([0, 2]), wts,
                                                         torch.tensor([1, 1, 0, 0, 0, 0, 0, 0])), ffn)
    half = decode_ffn.DecodeFFN(ffn.w_in_END, ffn.w_out_EDF, layer.shared.ffn.w_in.detach())
    with pytest.raises(RuntimeError, match="give both s_in and s_out"):
        decode_ffn.experts_step(x, decode_ffn.DecodeRows(tok, wts, torch.tensor([1, 1, 0, 0, 0, 0, 0, 0])), half)


def _router(layer: MoELayer) -> decode_ffn.DecodeRouter:
    from moekit.inference.fused_decode import _router as router_of

    return router_of(layer)


def _assert_same_step(step: decode_ffn.DecodeStep, staged, T: int) -> None:
    """y, the routing (ids, weights, logits, probs) and the dispatch (rows, slots,
    weights, counts) of the one-kernel step equal the staged path's."""
    y_ref, r_ref, p_ref = staged
    torch.testing.assert_close(step.y_TD, y_ref, **F32)
    assert torch.equal(step.expert_ids_TK, r_ref.expert_ids_TK)
    for name, ref in (("weights_TK", r_ref.weights_TK), ("logits_TE", r_ref.logits_TE), ("probs_TE", r_ref.probs_TE),
                      ("weights_R", p_ref.weights_R)):
        torch.testing.assert_close(getattr(step, name), ref, **F32)
    for name in ("token_idx_R", "slot_idx_R", "counts_E"):
        assert torch.equal(getattr(step, name), getattr(p_ref, name)), name
    assert step.y_TD.shape[0] == T


@needs_kernel
@pytest.mark.parametrize("order,normalize", [("before", True), ("before", False), ("after", True)])
@pytest.mark.parametrize("shared,gate", [(0, False), (1, True), (2, False)])
@pytest.mark.parametrize("T,top_k", [(1, 1), (1, 2), (3, 2), (8, 2), (5, 8)])
def test_layer_step_matches_the_stages(order, normalize, shared, gate, T, top_k):
    layer = _fused_layer(shared, gate, top_k, softmax_order=order, normalize_topk=normalize, router_bias=True)
    with torch.no_grad():
        layer.router.bias.normal_(0, 0.3)
        x_TD = torch.randn(T, 48, generator=torch.Generator().manual_seed(T * 10 + top_k))
        step = decode_ffn.layer_step(x_TD, _router(layer), _ffn(layer))
        staged = _staged(layer, x_TD)
    _assert_same_step(step, staged, T)


@needs_kernel
@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (4, 2), (2, 1)])
@pytest.mark.parametrize("normalize,scale", [(True, 2.5), (False, 1.0)])
@pytest.mark.parametrize("T,top_k", [(1, 2), (4, 3), (8, 1)])
def test_layer_step_matches_the_stages_sigmoid(n_group, topk_group, normalize, scale, T, top_k):
    """The DeepSeek-V3 router in the one-kernel step: sigmoid scores, a selection bias that
    stays out of the weights, group-limited selection, normalisation and scaling."""
    layer = _fused_layer(1, False, top_k, router="topk_sigmoid", n_group=n_group, topk_group=topk_group,
                         normalize_topk=normalize, routed_scaling_factor=scale)
    with torch.no_grad():
        layer.router.expert_bias.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
        x_TD = torch.randn(T, 48, generator=torch.Generator().manual_seed(T))
        step = decode_ffn.layer_step(x_TD, _router(layer), _ffn(layer))
        staged = _staged(layer, x_TD)
    _assert_same_step(step, staged, T)


@needs_kernel
@pytest.mark.parametrize("router", ["topk_softmax", "noisy_topk"])
def test_a_prepared_layer_reports_what_the_staged_one_does(router):
    """Through the swapped class (layer kind for top-k softmax, experts kind for the noisy
    router): the same y, aux loss, stats and state dict as the staged layer; calls the
    kernels do not cover (a gradient, more than FUSED_MAX_TOKENS tokens) go staged."""
    layer = _fused_layer(1, True, router=router, aux_loss_coef=0.01, z_loss_coef=0.001)
    keys = list(layer.state_dict())
    x = torch.randn(2, 3, 48)
    with torch.no_grad():
        slow = layer(x)
    prepared = prepare_for_inference(layer)
    assert type(layer) is FusedDecodeLayer and isinstance(layer, MoELayer)
    assert prepared.fused == {"": "layer" if router == "topk_softmax" else "experts"}
    assert list(layer.state_dict()) == keys
    with torch.no_grad():
        fast = layer(x)
        big = layer(torch.randn(1, FUSED_MAX_TOKENS + 1, 48))
    torch.testing.assert_close(fast.y, slow.y, **F32)
    torch.testing.assert_close(fast.aux_loss, slow.aux_loss, **F32)
    assert torch.equal(fast.stats.tokens_per_expert, slow.stats.tokens_per_expert)
    torch.testing.assert_close(fast.stats.router_entropy, slow.stats.router_entropy, **F32)
    assert big.y.shape == (1, FUSED_MAX_TOKENS + 1, 48)
    layer(x).y.sum().backward()  # grad mode: staged, and the router gets its gradient
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0
    restore(layer)
    assert type(layer) is MoELayer


@needs_kernel
def test_fusion_is_decided_when_the_model_is_prepared():
    assert fusion_for(_fused_layer(1, False)).kind == "layer"
    assert fusion_for(_fused_layer(1, False, router="topk_sigmoid")).kind == "layer"
    for kw in (dict(router="expert_choice"), dict(dispatch="capacity"), dict(router="noisy_topk")):
        assert fusion_for(_fused_layer(1, False, **kw)).kind == "experts", kw
    for kw in (dict(expert="gelu"), dict(experts_impl="loop"), dict(residual_d_ff=16), dict(router="soft_moe",
                                                                                            top_k=1)):
        assert fusion_for(_fused_layer(1, False, **kw)) is None, kw
    assert fusion_for(_fused_layer(1, False).double()) is None
    jitter = _fused_layer(1, False, jitter_eps=0.1)
    assert fusion_for(jitter).random_in_training
    prepare_for_inference(jitter)
    x = torch.randn(2, 48)
    with torch.no_grad():
        assert not jitter.train()._decode_step(x)  # training with jitter: random draws, staged
        assert jitter.eval()._decode_step(x)
        assert not jitter._decode_step(torch.randn(FUSED_MAX_TOKENS + 1, 48))
    assert not jitter._decode_step(x)  # grad mode

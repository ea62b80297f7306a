"""The routers beyond top-k (expert choice, hash, soft, Soft MoE, DSelect-k, DTS), expert
dropout and the PR-MoE residual: each variant's defining property, with hand-computed
answers where one exists."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from moekit import MoEConfig, MoELayer
from moekit.moe.router.dselect_k import smooth_step
from moekit.moe.router.dts import step_dts_schedule
from moekit.moe.router.expert_choice import expert_capacity
from moekit.moe.router.expert_dropout import drop_expert_slots


@contextmanager
def one_thread():
    """Tiny training loops: one thread avoids OpenMP spin-waits on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def small(**kw) -> MoEConfig:
    base = dict(d_model=16, num_experts=6, top_k=2, d_ff=8)
    base.update(kw)
    return MoEConfig(**base)


def expert_out(layer: MoELayer, x_TD: torch.Tensor, e: int) -> torch.Tensor:
    """Expert e of a SwiGLU bank applied to every token, written out by hand."""
    h = x_TD @ layer.experts.w_in[e].t()
    g, u = h.chunk(2, dim=-1)
    return (F.silu(g) * u) @ layer.experts.w_out[e].t()


# --- expert choice -------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_expert_choice_never_more_than_capacity(seed):
    g = torch.Generator().manual_seed(seed)
    T = int(torch.randint(1, 60, (1,), generator=g))
    E = int(torch.randint(1, 9, (1,), generator=g))
    k = int(torch.randint(1, E + 1, (1,), generator=g))
    cf = float(torch.empty(()).uniform_(0.1, 3.0, generator=g))
    layer = MoELayer(MoEConfig(d_model=8, num_experts=E, top_k=k, d_ff=4, router="expert_choice",
                               capacity_factor=cf, experts_impl="loop"))
    x = torch.randn(T, 8, generator=g)
    routing = layer.router(x)
    C = min(T, math.ceil(cf * T * k / E))
    assert expert_capacity(T, layer.cfg) == C
    per_expert = (routing.expert_ids_TK >= 0).sum(0)
    assert (per_expert <= C).all()
    assert (per_expert == C).all()  # each expert fills its C places (top-C over T >= C tokens)
    out = layer(x)
    assert (out.stats.tokens_per_expert <= C).all()
    none_T = (routing.expert_ids_TK < 0).all(1).float().mean()
    assert torch.allclose(out.stats.unrouted_fraction, none_T)


def test_expert_choice_hand_case():
    # 4 tokens, 2 experts, C = ceil(1 * 4 * 1 / 2) = 2. Router logits are x itself.
    cfg = MoEConfig(d_model=2, num_experts=2, top_k=1, d_ff=2, router="expert_choice", capacity_factor=1.0)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))
    x = torch.tensor([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    r = layer.router(x)
    p = torch.softmax(x, -1)
    # expert 0 takes the tokens with the largest p0: 0 and 1; expert 1 the largest p1: 3 and 2
    assert r.expert_ids_TK.tolist() == [[0, -1], [0, -1], [-1, 1], [-1, 1]]
    assert torch.allclose(r.weights_TK, p * (r.expert_ids_TK >= 0))


def test_expert_choice_token_can_get_several_or_none():
    cfg = MoEConfig(d_model=2, num_experts=3, top_k=1, d_ff=2, router="expert_choice", capacity_factor=1.0)
    layer = MoELayer(cfg)
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    # C = 1: experts 0 and 1 both want token 0, expert 2 wants token 1; token 2 gets none
    x = torch.tensor([[5.0, 0.0], [0.0, 5.0], [0.0, 0.0]])
    out = layer(x)
    ids = layer.router(x).expert_ids_TK
    assert (ids[0] >= 0).sum() == 2 and (ids[2] >= 0).sum() == 0
    assert torch.allclose(out.stats.unrouted_fraction, torch.tensor(1 / 3))
    assert torch.equal(out.y[2], torch.zeros(2))


# --- hash ----------------------------------------------------------------------------

def test_hash_needs_token_ids():
    layer = MoELayer(small(router="hash", router_options={"vocab_size": 50}))
    with pytest.raises(ValueError, match="token_ids"):
        layer(torch.randn(3, 16))


def test_hash_deterministic_and_ignores_router_weights():
    cfg = small(router="hash", router_options={"vocab_size": 50, "seed": 3})
    a, b = MoELayer(cfg), MoELayer(cfg)
    ids = torch.arange(-5, 80)  # negatives and ids past the table use the hash fallback
    x = torch.randn(ids.numel(), 16)
    ra = a.router(x, ids)
    with torch.no_grad():
        b.router.weight.normal_()
    rb = b.router(torch.randn_like(x), ids)
    assert torch.equal(ra.expert_ids_TK, rb.expert_ids_TK)
    assert torch.equal(ra.expert_ids_TK, a.router(x, ids).expert_ids_TK)
    assert torch.allclose(ra.weights_TK, torch.full_like(ra.weights_TK, 0.5))
    assert torch.allclose(ra.probs_TE.sum(-1), torch.ones(ids.numel()))
    # k distinct experts per token, all valid
    srt = ra.expert_ids_TK.sort(-1).values
    assert (srt[:, 1:] != srt[:, :-1]).all() and (srt >= 0).all() and (srt < 6).all()
    # a different seed gives a different table
    c = MoELayer(small(router="hash", router_options={"vocab_size": 50, "seed": 4}))
    assert not torch.equal(c.router(x, ids).expert_ids_TK, ra.expert_ids_TK)


def test_hash_without_table_and_layer_shapes():
    layer = MoELayer(small(router="hash", top_k=1))
    ids = torch.randint(0, 10_000, (2, 7))
    out = layer(torch.randn(2, 7, 16), token_ids=ids)
    r = layer.router(torch.randn(14, 16), ids.reshape(-1))
    same = ids.reshape(-1).unsqueeze(1) == ids.reshape(-1).unsqueeze(0)
    e = r.expert_ids_TK[:, 0]
    assert (e.unsqueeze(1) == e.unsqueeze(0))[same].all()  # equal ids, equal experts
    assert out.y.shape == (2, 7, 16)
    with pytest.raises(ValueError, match="vocab_size"):
        small(router="hash", router_options={"vocab_size": 0})
    with pytest.raises(ValueError, match="unknown"):
        small(router="hash", router_options={"vocab": 5})


def test_hash_table_is_balanced_over_vocab():
    layer = MoELayer(small(router="hash", num_experts=4, top_k=1, router_options={"vocab_size": 4000}))
    counts = torch.bincount(layer.router.table_VK[:, 0], minlength=4).float()
    assert (counts - 1000).abs().max() < 100  # 4000 ids, ~1000 per expert (binomial sd ~27)


# --- soft (dense, 1991) --------------------------------------------------------------

def test_soft_is_the_dense_softmax_mixture():
    torch.manual_seed(0)
    layer = MoELayer(small(router="soft", experts_impl="loop")).double()
    x = torch.randn(5, 16, dtype=torch.float64)
    out = layer(x)
    p = torch.softmax(x @ layer.router.weight.t(), -1)
    ref = sum(p[:, e : e + 1] * expert_out(layer, x, e) for e in range(6))
    assert torch.allclose(out.y, ref, atol=1e-12)
    assert (out.stats.tokens_per_expert == 5).all()


# --- Soft MoE (2023) -----------------------------------------------------------------

def soft_moe_reference(layer: MoELayer, x_BSD: torch.Tensor) -> torch.Tensor:
    """Puigcerver et al. 2023 Algorithm 1, one sequence at a time, one expert at a time."""
    router, P, E = layer.router, layer.router.slots_per_expert, layer.cfg.num_experts
    out = []
    for x_SD in x_BSD:
        phi = router.scale * F.normalize(router.weight, dim=-1)
        logits = F.normalize(x_SD, dim=-1) @ phi.t()  # (S, E·P)
        D_, C_ = torch.softmax(logits, dim=0), torch.softmax(logits, dim=1)
        slots = D_.t() @ x_SD
        ys = torch.cat([expert_out(layer, slots[e * P : (e + 1) * P], e) for e in range(E)])
        out.append(C_ @ ys)
    return torch.stack(out)


def test_soft_moe_matches_the_paper_algorithm():
    torch.manual_seed(0)
    layer = MoELayer(small(router="soft_moe", router_options={"slots_per_expert": 2})).double()
    with torch.no_grad():
        layer.router.scale.fill_(3.0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    ref = soft_moe_reference(layer, x)
    assert torch.allclose(out.y, ref, atol=1e-12)
    g = torch.randn_like(ref)
    (gx,) = torch.autograd.grad((out.y * g).sum(), x)
    (gr,) = torch.autograd.grad((ref * g).sum(), x)
    assert torch.allclose(gx, gr, atol=1e-12)
    assert (out.stats.tokens_per_expert == 3 * 2).all()  # B·P slots per expert
    assert out.losses == {} and float(out.aux_loss) == 0.0


def test_soft_moe_padding_does_not_leak():
    torch.manual_seed(0)
    layer = MoELayer(small(router="soft_moe")).double()
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True, False, False]])
    y1 = layer(x, mask=mask).y
    x2 = x.clone()
    x2[0, 4:] = torch.randn(2, 16, dtype=torch.float64)
    y2 = layer(x2, mask=mask).y
    assert torch.allclose(y1[0, :4], y2[0, :4], atol=1e-12)
    with pytest.raises(ValueError, match="aux_loss_coef"):
        small(router="soft_moe", aux_loss_coef=0.01)


# --- DSelect-k -----------------------------------------------------------------------

def test_smooth_step_is_the_cubic_of_eq4():
    t = torch.tensor([-2.0, -0.5, 0.0, 0.25, 0.5, 2.0], dtype=torch.float64)
    s = smooth_step(t, 1.0)
    assert s.tolist()[0] == 0.0 and s.tolist()[-1] == 1.0 and s.tolist()[2] == 0.5
    assert math.isclose(float(s[3]), -2 * 0.25**3 + 1.5 * 0.25 + 0.5)
    assert math.isclose(float(s[1]), 0.0, abs_tol=1e-15) and math.isclose(float(s[4]), 1.0)


@pytest.mark.parametrize("E", [8, 6])
def test_dselect_selectors_are_distributions(E):
    layer = MoELayer(small(router="dselect_k", num_experts=E, top_k=3))
    x = torch.randn(7, 16)
    r_TKE, alpha_TK = layer.router.selectors(x)
    assert r_TKE.shape == (7, 3, E)
    assert torch.allclose(r_TKE.sum(-1), torch.ones(7, 3))
    routing = layer.router(x)
    assert torch.allclose(routing.weights_TK.sum(-1), torch.ones(7))


def test_dselect_converges_to_k_one_hot_selectors():
    torch.manual_seed(0)
    with one_thread():
        cfg = MoEConfig(d_model=8, num_experts=8, top_k=2, d_ff=8, router="dselect_k", entropy_loss_coef=1.0)
        layer = MoELayer(cfg)
        x = torch.randn(4, 8).repeat(16, 1)  # 4 clusters of identical inputs
        y = x @ torch.randn(8, 8)
        live0 = (layer.router(x).expert_ids_TK >= 0).sum(1)
        assert (live0 > 2).all()  # dense at the start: smooth-step codes sit near 0.5
        opt = torch.optim.Adam(layer.parameters(), lr=0.05)
        for _ in range(100):
            out = layer(x)
            assert "entropy" in out.losses
            loss = (out.y - y).square().mean() + out.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        r_TKE, _ = layer.router.selectors(x)
        ids = layer.router(x).expert_ids_TK
    # every selector is exactly one-hot: k picks per token, so at most k live experts
    assert ((r_TKE == 0) | (r_TKE == 1)).all() and torch.equal(r_TKE.sum(-1), torch.ones(64, 2))
    assert ((ids >= 0).sum(1) <= 2).all()
    assert float(out.losses["entropy"].detach()) < 1e-6 and float((out.y - y).detach().square().mean()) < 0.1


def test_entropy_coef_only_for_dselect():
    with pytest.raises(ValueError, match="entropy_loss_coef"):
        small(entropy_loss_coef=0.1)
    out = MoELayer(small(router="dselect_k", entropy_loss_coef=0.5))(torch.randn(4, 16))
    assert torch.allclose(out.aux_loss, 0.5 * out.losses["entropy"])


# --- DTS (EvoMoE) --------------------------------------------------------------------

def test_dts_dense_at_start_top_k_at_end():
    layer = MoELayer(small(router="dts", router_options={"anneal_steps": 10}))
    x = torch.randn(32, 16)
    r0 = layer.router(x)
    assert (r0.expert_ids_TK >= 0).all()  # step 0: θ = 0, every expert passes
    assert torch.allclose(r0.weights_TK.sum(-1), torch.ones(32))
    step_dts_schedule(layer, 5)
    mid = (layer.router(x).expert_ids_TK >= 0).sum(1)
    assert (mid >= 2).all() and (mid <= 6).all()
    assert step_dts_schedule(layer, 10) == 1
    for mode in (True, False):
        layer.train(mode)
        r1 = layer.router(x)
        assert r1.expert_ids_TK.shape == (32, 2) and (r1.expert_ids_TK >= 0).all()
        assert (layer(x).stats.tokens_per_expert.sum() == 64).all()
    assert int(layer.state_dict()["router.schedule_step"]) == 10


def test_dts_temperature_schedule():
    layer = MoELayer(small(router="dts", router_options={"anneal_steps": 4, "temp_start": 2.0, "temp_end": 0.5}))
    taus = []
    for s in range(6):
        layer.router.step_schedule(s)
        taus.append(layer.router.schedule()[1])
    assert taus[0] == 2.0 and math.isclose(taus[2], 1.0) and taus[4] == taus[5] == 0.5


# --- expert dropout, PR-MoE residual, config ----------------------------------------

def test_expert_dropout_keeps_weight_sum_and_only_in_training():
    torch.manual_seed(0)
    layer = MoELayer(small(top_k=3, expert_dropout=0.5))
    x = torch.randn(200, 16)
    r = layer.router(x)
    d = drop_expert_slots(r, 0.5, torch.Generator().manual_seed(1))
    kept = d.expert_ids_TK >= 0
    assert 0.35 < kept.float().mean() < 0.65
    any_T = kept.any(1)
    assert torch.allclose(d.weights_TK.sum(-1)[any_T], r.weights_TK.sum(-1)[any_T])
    assert (d.weights_TK[~kept] == 0).all()
    assert float(layer(x).stats.tokens_per_expert.sum()) < 600  # slots dropped in training
    layer.eval()
    assert int(layer(x).stats.tokens_per_expert.sum()) == 600


def test_residual_moe_mixes_dense_and_routed_by_learned_coefficient():
    torch.manual_seed(0)
    layer = MoELayer(small(residual_d_ff=12)).double()
    plain = MoELayer(small()).double()
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("residual.")})
    with torch.no_grad():
        layer.residual.coef.weight.zero_()
        layer.residual.coef.bias.copy_(torch.tensor([math.log(3.0), 0.0]))  # softmax -> (0.75, 0.25)
    x = torch.randn(5, 16, dtype=torch.float64)
    ref = 0.75 * plain(x).y + 0.25 * layer.residual.mlp(x)
    assert torch.allclose(layer(x).y, ref, atol=1e-12)


@pytest.mark.parametrize("field,value", [("expert_dropout", 1.0), ("expert_dropout", -0.1),
                                         ("residual_d_ff", 0), ("entropy_loss_coef", -1.0)])
def test_new_fields_validated(field, value):
    with pytest.raises(ValueError, match=field):
        small(**{field: value})


def test_dts_draws_gumbel_noise_only_in_training():
    layer = MoELayer(small(router="dts"))
    x = torch.randn(8, 16)
    w = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        w.append(layer.router(x).weights_TK)
    assert not torch.equal(w[0], w[1])
    layer.eval()
    assert torch.equal(layer.router(x).weights_TK, layer.router(x).weights_TK)


def test_every_router_registers_with_moekit_moe_alone():
    """A config naming an HF family's router builds without importing moekit.models
    (a fresh interpreter: this test process has imported everything already)."""
    import subprocess
    import sys

    code = ("import sys, moekit.moe as m; from moekit.moe.router import ROUTERS; "
            "assert 'moekit.models' not in sys.modules; "
            "print(' '.join(ROUTERS.names())); "
            "m.MoEConfig(router='softmax_group_limited', d_model=8, d_ff=8); "
            "m.MoEConfig(router='topk_sigmoid_plain', d_model=8, d_ff=8)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert {"softmax_group_limited", "topk_sigmoid_plain"} <= set(out.stdout.split())

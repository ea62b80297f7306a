"""Capacity, edge cases, routing stats and dtypes of the MoE layer.

Cases whose answers are worked out by hand (hand-set router weights or hand-made
Routing objects), plus shape edge cases run for every router x dispatch of the
registries: experts with no tokens, all tokens on one expert, one token, T = 0.
"""

from __future__ import annotations

import math

import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.moe.dispatch import DISPATCHERS
from moekit.moe.router import ROUTERS
from moekit.moe.types import Routing

D, E = 4, 4
LOSS_COEFS = dict(aux_loss_coef=0.1, cv2_loss_coef=0.1, z_loss_coef=0.1, seq_aux_loss_coef=0.1)


def edge_config(router: str, dispatch: str, **kw) -> MoEConfig:
    """Every loss on where the router allows it (soft_moe has no per-token losses)."""
    base = dict(d_model=D, num_experts=E, top_k=2, d_ff=3, router=router, dispatch=dispatch,
                capacity_factor=1.0, num_shared_experts=1, init_std=0.5)
    base.update(kw)
    try:
        return MoEConfig(**base, **LOSS_COEFS)
    except ValueError:
        pass
    try:
        return MoEConfig(**base)
    except ValueError as e:
        if router == "topk_softmax":
            raise
        pytest.skip(f"router {router!r} rejects this combination: {e}")


def hand_routing(ids_TK, weights_TK, num_experts: int) -> Routing:
    ids = torch.tensor(ids_TK, dtype=torch.long)
    w = torch.tensor(weights_TK, dtype=torch.float64)
    T = ids.shape[0]
    logits = torch.zeros(T, num_experts, dtype=torch.float64)
    return Routing(ids, w, logits, torch.softmax(logits, -1))


def check_finite_everywhere(layer: MoELayer, x: torch.Tensor, token_ids: torch.Tensor):
    x = x.detach().requires_grad_()
    out = layer(x, token_ids=token_ids)
    assert out.y.shape == x.shape and out.y.dtype == x.dtype
    assert torch.isfinite(out.y).all()
    assert torch.isfinite(out.aux_loss) and all(torch.isfinite(v) for v in out.losses.values())
    for name in ("tokens_per_expert", "drop_fraction", "router_entropy", "dead_experts", "unrouted_fraction"):
        assert torch.isfinite(getattr(out.stats, name).float()).all(), name
    assert out.stats.tokens_per_expert.shape == (E,)
    assert int(out.stats.dead_experts) == int((out.stats.tokens_per_expert == 0).sum())
    layer.zero_grad(set_to_none=True)
    (out.y.sum() + out.aux_loss).backward()
    assert torch.isfinite(x.grad).all()
    for n, p in layer.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), n
    return out


EVERY_ROUTER_DISPATCH = pytest.mark.parametrize(
    "router,dispatch", [(r, d) for r in ROUTERS.names() for d in DISPATCHERS.names()])


@EVERY_ROUTER_DISPATCH
@pytest.mark.parametrize("shape", [(0,), (2, 0), (0, 3)], ids=["T0", "B2S0", "B0S3"])
def test_empty_batch(router, dispatch, shape):
    layer = MoELayer(edge_config(router, dispatch)).double().train()
    x = torch.randn(*shape, D, dtype=torch.float64)
    out = check_finite_everywhere(layer, x, torch.zeros(shape, dtype=torch.long))
    assert int(out.stats.tokens_per_expert.sum()) == 0 and float(out.stats.drop_fraction) == 0.0


@EVERY_ROUTER_DISPATCH
@pytest.mark.parametrize("shape", [(1,), (1, 1)], ids=["T1", "B1S1"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_one_token(router, dispatch, shape, train):
    layer = MoELayer(edge_config(router, dispatch)).double().train(train)
    x = torch.randn(*shape, D, dtype=torch.float64)
    out = check_finite_everywhere(layer, x, torch.full(shape, 5, dtype=torch.long))
    assert out.stats.drop_fraction <= 1 and out.stats.unrouted_fraction in (0.0, 1.0)


@EVERY_ROUTER_DISPATCH
def test_identical_tokens_leave_experts_empty(router, dispatch):
    """Identical tokens (and token ids) go to the same experts in eval, so the other
    experts get zero rows: their (zero) gradients and the stats must stay finite."""
    layer = MoELayer(edge_config(router, dispatch, top_k=1)).double().eval()
    x = torch.randn(1, D, dtype=torch.float64).expand(2, 6, D).contiguous()
    check_finite_everywhere(layer, x, torch.full((2, 6), 3, dtype=torch.long))


@EVERY_ROUTER_DISPATCH
def test_hand_set_router_sends_everything_to_one_expert(router, dispatch):
    """Router weight set by hand (row 2 large, the rest zero) with positive tokens: expert 2
    is every token's favourite, so it is the most requested and others go empty."""
    try:
        cfg = MoEConfig(d_model=D, num_experts=E, top_k=1, d_ff=3, router=router, dispatch=dispatch)
    except ValueError:
        cfg = edge_config(router, dispatch)
    layer = MoELayer(cfg).double().eval()
    if tuple(layer.router.weight.shape) != (E, D):
        pytest.skip(f"router {router!r} has no (E, D) projection to set by hand")
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2] = 5.0
    x = torch.rand(2, 6, D, dtype=torch.float64) + 0.1
    out = check_finite_everywhere(layer, x, torch.arange(12).view(2, 6))
    if layer.router.weight.grad is None:
        pytest.skip(f"router {router!r} does not route by its projection (e.g. by token id)")
    requested = out.stats.requested_per_expert
    assert requested[2] == requested.max() and requested[2] > 0
    if cfg.top_k == 1 and router in ("topk_softmax", "topk_sigmoid", "noisy_topk"):
        assert requested.tolist() == [0, 0, 12, 0] and int(out.stats.dead_experts) >= 3


def one_expert_layer(dispatch: str, capacity_factor: float = 1.0) -> MoELayer:
    """topk_softmax, K=1, router weights set by hand so every positive token picks expert 2."""
    cfg = MoEConfig(d_model=D, num_experts=E, top_k=1, d_ff=3, dispatch=dispatch,
                    capacity_factor=capacity_factor, init_std=0.5)
    layer = MoELayer(cfg).double()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[2] = 5.0
    return layer


@pytest.mark.parametrize("impl", ["cpu", "loop"])
def test_all_tokens_to_one_expert_dropless(impl):
    layer = one_expert_layer("dropless")
    layer.experts.set_impl(impl)
    x = torch.rand(8, D, dtype=torch.float64) + 0.1  # positive: logit of expert 2 is largest
    res = layer(x)
    assert res.stats.tokens_per_expert.tolist() == [0, 0, 8, 0]
    assert int(res.stats.dead_experts) == 3 and float(res.stats.drop_fraction) == 0.0
    # K=1 with renormalisation: weight 1, so y is expert 2's FFN of each token
    w_in, w_out = layer.experts.w_in[2], layer.experts.w_out[2]
    expected = layer.experts.act.fwd(x @ w_in.t()) @ w_out.t()
    torch.testing.assert_close(res.y, expected, atol=1e-12, rtol=1e-12)
    res.y.sum().backward()
    assert layer.experts.w_in.grad[[0, 1, 3]].abs().sum() == 0 and layer.experts.w_in.grad[2].abs().sum() > 0


def test_all_tokens_to_one_expert_capacity_drops_by_hand():
    # T=8, K=1, E=4, capacity_factor=1: C = ceil(1 * 8 * 1 / 4) = 2; 8 requests for expert 2
    layer = one_expert_layer("capacity", capacity_factor=1.0)
    x = torch.rand(8, D, dtype=torch.float64) + 0.1
    res = layer(x)
    assert res.stats.requested_per_expert.tolist() == [0, 0, 8, 0]
    assert res.stats.tokens_per_expert.tolist() == [0, 0, 2, 0]
    assert float(res.stats.drop_fraction) == pytest.approx(6 / 8, abs=1e-12)
    assert float(res.stats.unrouted_fraction) == pytest.approx(6 / 8, abs=1e-12)
    # "position": the first two tokens are kept, the rest get nothing from the experts
    w_in, w_out = layer.experts.w_in[2], layer.experts.w_out[2]
    kept = layer.experts.act.fwd(x[:2] @ w_in.t()) @ w_out.t()
    torch.testing.assert_close(res.y[:2], kept, atol=1e-12, rtol=1e-12)
    assert res.y[2:].abs().max() == 0


# ---------------------------------------------------------------- capacity by hand

def capacity_plan(routing: Routing, policy: str, capacity_factor: float, top_k: int):
    cfg = MoEConfig(d_model=D, num_experts=routing.num_experts, top_k=top_k, d_ff=3,
                    dispatch="capacity", capacity_factor=capacity_factor, drop_policy=policy)
    return DISPATCHERS.get("capacity")(routing, cfg)


# T=4, K=2, E=3. Expert 0 is the second choice of tokens 0, 1 and the first of 2, 3.
IDS = [[1, 0], [2, 0], [0, 1], [0, 2]]
# second-choice weights of tokens 0, 1 on expert 0 are the largest of expert 0's four
WEIGHTS = [[0.5, 0.45], [0.5, 0.44], [0.3, 0.2], [0.4, 0.3]]


def kept_slots(plan) -> set[int]:
    return set(plan.slot_idx_R.tolist())


def test_capacity_position_keeps_first_choices_first():
    # C = ceil(0.75 * 4 * 2 / 3) = 2
    plan = capacity_plan(hand_routing(IDS, WEIGHTS, 3), "position", 0.75, 2)
    assert plan.capacity == 2
    # expert 0 keeps the first choices of tokens 2, 3 (slots 4, 6), drops slots 1, 3
    assert kept_slots(plan) == {0, 2, 4, 5, 6, 7}
    assert plan.counts_E.tolist() == [2, 2, 2] and plan.requested_E.tolist() == [4, 2, 2]
    assert (plan.counts_E <= plan.capacity).all()


def test_capacity_probability_keeps_highest_weights():
    plan = capacity_plan(hand_routing(IDS, WEIGHTS, 3), "probability", 0.75, 2)
    # expert 0's weights: slot1 .45, slot3 .44, slot4 .3, slot6 .4 -> keeps slots 1, 3
    assert kept_slots(plan) == {0, 1, 2, 3, 5, 7}
    assert plan.counts_E.tolist() == [2, 2, 2]


def test_capacity_rows_are_grouped_by_expert_and_weights_gathered():
    routing = hand_routing(IDS, WEIGHTS, 3)
    plan = capacity_plan(routing, "position", 0.75, 2)
    experts_R = routing.expert_ids_TK.reshape(-1)[plan.slot_idx_R]
    assert experts_R.tolist() == sorted(experts_R.tolist())
    torch.testing.assert_close(plan.weights_R, routing.weights_TK.reshape(-1)[plan.slot_idx_R])
    assert plan.token_idx_R.tolist() == (plan.slot_idx_R // 2).tolist()


@pytest.mark.parametrize("policy", ["position", "probability"])
def test_dropped_slots_contribute_nothing(policy):
    cfg = MoEConfig(d_model=D, num_experts=3, top_k=2, d_ff=3, dispatch="capacity",
                    capacity_factor=0.75, drop_policy=policy, init_std=0.5)
    layer = MoELayer(cfg).double()
    routing = hand_routing(IDS, WEIGHTS, 3)
    plan = DISPATCHERS.get("capacity")(routing, cfg)
    x = torch.randn(4, D, dtype=torch.float64)
    kept = kept_slots(plan)
    bank = layer.experts
    expected = torch.zeros(4, D, dtype=torch.float64)
    for t in range(4):
        for k in range(2):
            if t * 2 + k in kept:
                e = IDS[t][k]
                expected[t] += WEIGHTS[t][k] * (bank.act.fwd(x[t] @ bank.w_in[e].t()) @ bank.w_out[e].t())
    for impl in ("cpu", "loop"):
        bank.set_impl(impl)
        torch.testing.assert_close(bank(x, plan), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("router", ROUTERS.names())
@pytest.mark.parametrize("policy", ["position", "probability"])
def test_capacity_bound_and_drop_fraction_for_every_router(router, policy):
    cfg = edge_config(router, "capacity", capacity_factor=0.5, drop_policy=policy)
    layer = MoELayer(cfg).double().eval()
    x = torch.randn(3, 8, D, dtype=torch.float64)
    token_ids = torch.randint(0, 100, (3, 8))
    out = layer(x, token_ids=token_ids)
    C = math.ceil(0.5 * 24 * cfg.top_k / E)
    if getattr(layer.router, "mixes_tokens", False):
        pytest.skip(f"router {router!r} fills fixed slots; capacity does not apply")
    routing = layer.router(x.reshape(-1, D), token_ids.reshape(-1))
    ids = routing.expert_ids_TK.reshape(-1)
    requested = torch.bincount(ids[ids >= 0], minlength=E)
    assert out.stats.requested_per_expert.tolist() == requested.tolist()
    assert (out.stats.tokens_per_expert <= C).all()
    assert out.stats.tokens_per_expert.tolist() == requested.clamp(max=C).tolist()
    expected_drop = 1 - requested.clamp(max=C).sum().item() / max(requested.sum().item(), 1)
    assert float(out.stats.drop_fraction) == pytest.approx(expected_drop, abs=1e-6)  # stats are fp32


# ---------------------------------------------------------------- stats by hand

def test_stats_uniform_router_entropy_is_log_e():
    layer = MoELayer(MoEConfig(d_model=D, num_experts=E, top_k=1, d_ff=3)).double()
    with torch.no_grad():
        layer.router.weight.zero_()
    out = layer(torch.randn(5, D, dtype=torch.float64))
    assert float(out.stats.router_entropy) == pytest.approx(math.log(E), abs=1e-12)


def test_stats_hand_case_counts_dead_experts_entropy():
    # D=2, E=2 router = identity: token [ln3, 0] has p = (3/4, 1/4) -> expert 0;
    # token [0, ln3] has p = (1/4, 3/4) -> expert 1. Three of the first, one of the second.
    cfg = MoEConfig(d_model=2, num_experts=2, top_k=1, d_ff=3)
    layer = MoELayer(cfg).double()
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))
    l3 = math.log(3)
    x = torch.tensor([[l3, 0.0], [l3, 0.0], [0.0, l3], [l3, 0.0]], dtype=torch.float64)
    out = layer(x)
    assert out.stats.tokens_per_expert.tolist() == [3, 1]
    assert int(out.stats.dead_experts) == 0
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert float(out.stats.router_entropy) == pytest.approx(h, abs=1e-12)
    # the same tokens all on expert 0: one dead expert
    out = layer(x[[0, 1, 3]])
    assert out.stats.tokens_per_expert.tolist() == [3, 0] and int(out.stats.dead_experts) == 1


# ---------------------------------------------------------------- dtypes and bad input

@pytest.mark.parametrize("router", ROUTERS.names())
def test_bf16_runs_and_router_math_is_fp32(router):
    layer = MoELayer(edge_config(router, "dropless")).to(torch.bfloat16)
    x = torch.randn(2, 5, D, dtype=torch.bfloat16, requires_grad=True)
    token_ids = torch.randint(0, 100, (2, 5))
    out = layer(x, token_ids=token_ids)
    assert out.y.dtype == torch.bfloat16 and torch.isfinite(out.y).all()
    (out.y.float().sum() + out.aux_loss).backward()
    assert torch.isfinite(x.grad.float()).all()
    if not getattr(layer.router, "mixes_tokens", False):
        routing = layer.router(x.reshape(-1, D), token_ids.reshape(-1))
        assert routing.logits_TE.dtype == torch.float32
        assert routing.weights_TK.dtype == torch.float32


def test_fp64_router_math_stays_fp64():
    layer = MoELayer(MoEConfig(d_model=D, num_experts=E, d_ff=3)).double()
    routing = layer.router(torch.randn(3, D, dtype=torch.float64))
    assert routing.logits_TE.dtype == torch.float64


@pytest.mark.parametrize("shape", [(3, D + 1), (2, 3, D - 1), (3, 2, 2), ()])
def test_wrong_input_width_is_rejected_at_forward(shape):
    layer = MoELayer(MoEConfig(d_model=D, num_experts=E, d_ff=3))
    with pytest.raises(ValueError, match=rf"expected d_model={D}") as err:
        layer(torch.randn(size=shape))
    assert str(tuple(shape)) in str(err.value)  # the message shows the offending shape


NEEDS_TOKEN_IDS = [r for r in ROUTERS.names() if getattr(ROUTERS.get(r), "needs_token_ids", False)]


@pytest.mark.parametrize("router", NEEDS_TOKEN_IDS or [pytest.param(None, marks=pytest.mark.skip(
    reason="no registered router declares needs_token_ids"))])
def test_router_that_needs_token_ids_says_so(router):
    layer = MoELayer(edge_config(router, "dropless"))
    with pytest.raises(ValueError, match="token_ids"):
        layer(torch.randn(3, D))

"""Balance losses with hand-set weights whose values are worked out on paper.

The skewed case used throughout: D = 2, E = 2, K = 1, router weight = identity, so the
logits are the token itself. Token a = [ln 3, 0] has p = (3/4, 1/4) and picks expert 0;
token b = [0, ln 3] has p = (1/4, 3/4) and picks expert 1. The batch is a, a, a, b.
"""

from __future__ import annotations

import math

import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.moe.balance import cv2_loss, cv_squared, router_z_loss, seq_aux_loss, switch_aux_loss
from moekit.moe.types import Routing

L3 = math.log(3.0)
A, B = [L3, 0.0], [0.0, L3]


def val(t: torch.Tensor) -> float:
    return t.detach().item()


def skewed_layer(**kw) -> MoELayer:
    cfg = MoEConfig(d_model=2, num_experts=2, top_k=1, d_ff=3, **kw)
    layer = MoELayer(cfg).double()
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(2))
    return layer


def skewed_x() -> torch.Tensor:
    return torch.tensor([A, A, A, B], dtype=torch.float64)


def uniform_layer(E=4, K=2, **kw) -> MoELayer:
    layer = MoELayer(MoEConfig(d_model=3, num_experts=E, top_k=K, d_ff=3, **kw)).double()
    with torch.no_grad():
        layer.router.weight.zero_()
    return layer


def route(layer: MoELayer, x: torch.Tensor) -> Routing:
    return layer.router(x.reshape(-1, x.shape[-1]))


# ---------------------------------------------------------------- Switch / GShard

@pytest.mark.parametrize("E,K", [(4, 1), (4, 2), (8, 2), (3, 3)])
def test_switch_aux_is_one_under_uniform_routing(E, K):
    layer = uniform_layer(E, K, aux_loss_coef=1.0)
    out = layer(torch.randn(2, 5, 3, dtype=torch.float64))
    assert val(out.losses["switch"]) == pytest.approx(1.0, abs=1e-12)
    assert val(out.aux_loss) == pytest.approx(1.0, abs=1e-12)


def test_switch_aux_skewed_by_hand():
    # f = (3/4, 1/4); P = ((3·3/4 + 1/4)/4, (3·1/4 + 3/4)/4) = (5/8, 3/8)
    # loss = E · Σ f P = 2 · (15/32 + 3/32) = 9/8
    layer = skewed_layer(aux_loss_coef=0.5)
    out = layer(skewed_x())
    assert val(out.losses["switch"]) == pytest.approx(9 / 8, abs=1e-12)
    assert val(out.aux_loss) == pytest.approx(0.5 * 9 / 8, abs=1e-12)


def test_switch_aux_gradient_flows_to_router_only_through_p():
    layer = skewed_layer(aux_loss_coef=1.0)
    out = layer(skewed_x())
    out.aux_loss.backward()
    # dL/dlogits of token t = E · (f - (f·p_t)) ⊙ p_t / T: nonzero for the router, and the
    # experts do not see the aux loss at all
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.experts.w_in.grad is None


# ---------------------------------------------------------------- CV² (Shazeer 2017)

def test_cv_squared_by_hand():
    # (3, 1): mean 2, population variance 1 -> 1/4; equal entries -> 0
    assert val(cv_squared(torch.tensor([3.0, 1.0], dtype=torch.float64))) == pytest.approx(0.25, abs=1e-9)
    assert val(cv_squared(torch.tensor([2.0, 2.0, 2.0]))) == 0.0


def test_cv2_loss_skewed_by_hand():
    # normalize_topk=False: each gate is the top-1 probability 3/4.
    # importance = (9/4, 3/4): mean 3/2, var 9/16 -> CV² = 1/4; load = (3, 1) -> CV² = 1/4
    layer = skewed_layer(cv2_loss_coef=1.0, normalize_topk=False)
    out = layer(skewed_x())
    assert val(out.losses["cv2"]) == pytest.approx(0.5, abs=1e-9)


def test_cv2_loss_is_zero_when_balanced():
    layer = skewed_layer(cv2_loss_coef=1.0, normalize_topk=False)
    out = layer(torch.tensor([A, B, A, B], dtype=torch.float64))
    assert val(out.losses["cv2"]) == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------- z-loss (ST-MoE)

@pytest.mark.parametrize("E", [2, 4, 8])
def test_z_loss_zero_logits_is_log_e_squared(E):
    layer = uniform_layer(E, 1, z_loss_coef=1.0)
    out = layer(torch.randn(6, 3, dtype=torch.float64))
    assert val(out.losses["z"]) == pytest.approx(math.log(E) ** 2, abs=1e-12)


def test_z_loss_skewed_by_hand():
    # every token has logsumexp = log(e^{ln 3} + e^0) = log 4
    layer = skewed_layer(z_loss_coef=1.0)
    out = layer(skewed_x())
    assert val(out.losses["z"]) == pytest.approx(math.log(4.0) ** 2, abs=1e-12)


# ---------------------------------------------------------------- sequence-wise (DeepSeek-V3)

@pytest.mark.parametrize("E,K", [(4, 1), (4, 2), (6, 3)])
def test_seq_aux_is_one_under_uniform(E, K):
    layer = uniform_layer(E, K, seq_aux_loss_coef=1.0)
    out = layer(torch.randn(3, 7, 3, dtype=torch.float64))
    assert val(out.losses["seq_aux"]) == pytest.approx(1.0, abs=1e-12)


def test_seq_aux_skewed_by_hand():
    # one sequence a, a, a, b: f_i = E/(K·S)·count = 2/4·(3, 1) = (3/2, 1/2); P = (5/8, 3/8)
    # Σ f P = 15/16 + 3/16 = 9/8
    layer = skewed_layer(seq_aux_loss_coef=1.0)
    out = layer(skewed_x().unsqueeze(0))
    assert val(out.losses["seq_aux"]) == pytest.approx(9 / 8, abs=1e-12)


def test_seq_aux_averages_over_sequences():
    # sequence 1 = a a a b (9/8), sequence 2 = a b a b (balanced: f = (1, 1), P = (1/2, 1/2) -> 1)
    layer = skewed_layer(seq_aux_loss_coef=1.0)
    x = torch.tensor([[A, A, A, B], [A, B, A, B]], dtype=torch.float64)
    out = layer(x)
    assert val(out.losses["seq_aux"]) == pytest.approx((9 / 8 + 1.0) / 2, abs=1e-12)


# ---------------------------------------------------------------- padding mask

ALL_LOSSES = dict(aux_loss_coef=1.0, cv2_loss_coef=1.0, z_loss_coef=1.0, seq_aux_loss_coef=1.0)


def test_mask_leaves_padded_tokens_out_by_hand():
    # real tokens a a a b plus two padded b's (which would change every loss)
    layer = skewed_layer(**ALL_LOSSES, normalize_topk=False)
    x = torch.tensor([[A, A, A, B, B, B]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True, False, False]])
    out = layer(x, mask=mask)
    assert val(out.losses["switch"]) == pytest.approx(9 / 8, abs=1e-12)
    assert val(out.losses["seq_aux"]) == pytest.approx(9 / 8, abs=1e-12)
    assert val(out.losses["cv2"]) == pytest.approx(0.5, abs=1e-9)
    assert val(out.losses["z"]) == pytest.approx(math.log(4.0) ** 2, abs=1e-12)
    unmasked = layer(x)
    assert val(unmasked.losses["switch"]) != pytest.approx(9 / 8, abs=1e-6)  # the mask mattered


def test_mask_equals_dropping_the_padded_tokens():
    """Random routing, two sequences with different real lengths: each masked loss equals
    the loss of the real tokens alone (per sequence for seq_aux)."""
    layer = MoELayer(MoEConfig(d_model=5, num_experts=4, top_k=2, d_ff=3, init_std=0.5, **ALL_LOSSES)).double()
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    lengths = [6, 3]
    mask = torch.arange(6).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    masked = layer(x, mask=mask).losses
    real_x = torch.cat([x[b, : lengths[b]] for b in range(2)])
    alone = layer(real_x).losses
    for name in ("switch", "cv2", "z"):
        torch.testing.assert_close(masked[name], alone[name], atol=1e-12, rtol=1e-12)
    per_seq = [val(layer(x[b : b + 1, : lengths[b]]).losses["seq_aux"]) for b in range(2)]
    assert val(masked["seq_aux"]) == pytest.approx(sum(per_seq) / 2, abs=1e-12)
    # padded tokens' values do not matter at all
    x2 = x.clone()
    x2[1, 3:] = 100.0
    again = layer(x2, mask=mask).losses
    for name in masked:
        torch.testing.assert_close(again[name], masked[name], atol=1e-12, rtol=1e-12)


def test_loss_functions_on_empty_routing_are_zero():
    E = 3
    r = Routing(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), torch.zeros(0, E), torch.zeros(0, E))
    for value in (switch_aux_loss(r), cv2_loss(r), router_z_loss(r), seq_aux_loss(r, (0,))):
        assert val(value) == 0.0


def test_losses_skip_empty_slots():
    # slot -1 (no expert) counts for no expert: f over the 3 assigned slots only
    p = torch.tensor([[0.75, 0.25]] * 3, dtype=torch.float64)
    r = Routing(torch.tensor([[0, -1], [0, 1], [0, -1]]), torch.ones(3, 2, dtype=torch.float64),
                torch.zeros(3, 2, dtype=torch.float64), p)
    # f = (3/4, 1/4) of the 4 assigned slots, P = (3/4, 1/4) -> 2 · (9/16 + 1/16) = 5/4
    # (counting the 6 slots would give f = (1/2, 1/6) and 5/6)
    assert val(switch_aux_loss(r)) == pytest.approx(1.25, abs=1e-12)

"""Aux-loss-free balancing (DeepSeek-V3 §2.1.2): the load accumulator over micro-batches
and the per-step bias update across a model's routers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moekit import MoEConfig, MoELayer
from moekit.moe.balance import LoadAccumulator, cv_squared, update_expert_bias, update_router_biases


def sigmoid_cfg(**kw) -> MoEConfig:
    base = dict(d_model=16, num_experts=8, top_k=2, d_ff=8, router="topk_sigmoid", bias_update_rate=0.01)
    base.update(kw)
    return MoEConfig(**base)


def skewed_layer() -> MoELayer:
    """A router whose scores favour experts 0 and 1 (x below has a positive mean), with
    enough spread between tokens that a bias step of 0.01 moves a few tokens at a time."""
    layer = MoELayer(sigmoid_cfg())
    with torch.no_grad():
        layer.router.weight.normal_(0.0, 0.3)
        layer.router.weight[:2] += 0.1
    return layer


def skewed_input(n: int = 256) -> torch.Tensor:
    return torch.randn(n, 16) * 0.5 + 0.5


def test_accumulator_sums_micro_batches_and_steps_once():
    layer = skewed_layer()
    acc = LoadAccumulator()
    xs = [skewed_input(64) for _ in range(3)]
    outs = [layer(x) for x in xs]
    for o in outs:
        acc.add(o.stats)
    total = sum(o.stats.requested_per_expert.float() for o in outs)
    assert torch.equal(acc.loads[0], total)
    expected = torch.zeros(8)
    update_expert_bias(expected, total, 0.01)
    assert acc.step(layer) == 1
    assert torch.allclose(layer.router.expert_bias, expected)
    assert acc.loads is None and acc.step(layer) == 0  # reset: a second step moves nothing
    assert torch.allclose(layer.router.expert_bias, expected)


def test_bias_update_moves_load_toward_uniform():
    layer = skewed_layer()
    x = skewed_input()
    acc = LoadAccumulator()
    cvs = []
    with torch.no_grad():
        for _ in range(60):
            for half in x.chunk(2):  # two micro-batches per step
                acc.add(layer(half).stats)
            cvs.append(float(cv_squared(sum(acc.loads)).sqrt()))
            acc.step(layer)
    assert cvs[0] > 0.9  # experts 0 and 1 take most slots
    assert sum(cvs[-10:]) / 10 < 0.25 * cvs[0]


def test_update_router_biases_skips_layers_without_bias():
    model = nn.Sequential(MoELayer(sigmoid_cfg()), MoELayer(sigmoid_cfg(router="topk_softmax")),
                          MoELayer(sigmoid_cfg()))
    loads = [torch.tensor([8.0, 0, 0, 0, 0, 0, 0, 0])] * 3
    assert update_router_biases(model, loads, rate=0.5) == 2
    expected = torch.tensor([-0.5] + [0.5] * 7)
    assert torch.equal(model[0].router.expert_bias, expected) and torch.equal(model[2].router.expert_bias, expected)
    with pytest.raises(ValueError, match="3 MoE routers"):
        update_router_biases(model, loads[:2])
    acc = LoadAccumulator()
    stats = MoELayer(sigmoid_cfg())(torch.randn(4, 16)).stats
    acc.add([stats, None, stats, stats])  # None: a dense layer of an LM
    assert len(acc.loads) == 3 and acc.step(model) == 2
    acc.add([stats] * 3)
    with pytest.raises(ValueError, match="layers"):
        acc.add([MoELayer(sigmoid_cfg())(torch.randn(4, 16)).stats])

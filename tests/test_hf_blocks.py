"""transformers' MoE blocks and MoELayer agree: Mixtral, Qwen2-MoE (shared expert with a
sigmoid gate, no top-k renormalisation by default) and Qwen3-MoE, tiny random fp32."""

from __future__ import annotations

import pytest
import torch

from moekit import MoELayer
from moekit.interop import (
    load_mixtral_block,
    load_qwen2_moe_block,
    load_qwen3_moe_block,
    moe_config_from_mixtral,
    moe_config_from_qwen2_moe,
    moe_config_from_qwen3_moe,
    store_mixtral_block,
    store_qwen2_moe_block,
)

transformers = pytest.importorskip("transformers")
from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock  # noqa: E402
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: E402

D, E, K, F, FS = 16, 6, 2, 12, 20


def randomize(block: torch.nn.Module) -> torch.nn.Module:
    """HF leaves expert weights uninitialised (torch.empty) and the Qwen gate at zero."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return block.eval()


def mixtral(**kw):
    cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K, **kw)
    return cfg, randomize(MixtralSparseMoeBlock(cfg))


def qwen2(**kw):
    cfg = Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=F, shared_expert_intermediate_size=FS,
                         num_experts=E, num_experts_per_tok=K, **kw)
    return cfg, randomize(Qwen2MoeSparseMoeBlock(cfg))


def qwen3(**kw):
    cfg = Qwen3MoeConfig(hidden_size=D, moe_intermediate_size=F, num_experts=E, num_experts_per_tok=K, **kw)
    return cfg, randomize(Qwen3MoeSparseMoeBlock(cfg))


def x_BSD():
    return torch.randn(2, 7, D, generator=torch.Generator().manual_seed(5))


def assert_block_equal(layer: MoELayer, block: torch.nn.Module, x: torch.Tensor):
    with torch.no_grad():
        y_hf = block(x.clone())
        y = layer(x).y
    assert y_hf.abs().max() > 1e-2  # a real signal, not tolerance-sized
    torch.testing.assert_close(y, y_hf, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "loop"])
def test_mixtral_block_parity(backend):
    hf_cfg, block = mixtral()
    cfg = moe_config_from_mixtral(hf_cfg, experts_impl=backend)
    assert (cfg.num_experts, cfg.top_k, cfg.d_ff, cfg.normalize_topk, cfg.expert) == (E, K, F, True, "swiglu")
    layer = load_mixtral_block(MoELayer(cfg), block)
    assert_block_equal(layer, block, x_BSD())


@pytest.mark.parametrize("norm_topk_prob", [False, True])
@pytest.mark.parametrize("backend", ["auto", "loop"])
def test_qwen2_moe_block_parity(norm_topk_prob, backend):
    hf_cfg, block = qwen2(norm_topk_prob=norm_topk_prob)
    cfg = moe_config_from_qwen2_moe(hf_cfg, experts_impl=backend)
    assert cfg.normalize_topk is norm_topk_prob
    assert (cfg.num_shared_experts, cfg.shared_d_ff, cfg.shared_gate) == (1, FS, True)
    layer = load_qwen2_moe_block(MoELayer(cfg), block)
    assert_block_equal(layer, block, x_BSD())


def test_qwen2_moe_default_does_not_renormalise():
    hf_cfg, block = qwen2()
    assert moe_config_from_qwen2_moe(hf_cfg).normalize_topk is False
    layer = load_qwen2_moe_block(MoELayer(moe_config_from_qwen2_moe(hf_cfg)), block)
    # guard: the renormalised layer gives a different answer, so the parity above is not vacuous
    wrong = load_qwen2_moe_block(MoELayer(moe_config_from_qwen2_moe(hf_cfg, normalize_topk=True)), block)
    x = x_BSD()
    with torch.no_grad():
        assert (wrong(x).y - layer(x).y).abs().max() > 1e-3


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_qwen3_moe_block_parity(norm_topk_prob):
    hf_cfg, block = qwen3(norm_topk_prob=norm_topk_prob)
    cfg = moe_config_from_qwen3_moe(hf_cfg)
    assert cfg.num_shared_experts == 0 and cfg.normalize_topk is norm_topk_prob
    layer = load_qwen3_moe_block(MoELayer(cfg), block)
    assert_block_equal(layer, block, x_BSD())


def test_store_round_trips_into_fresh_hf_blocks():
    hf_cfg, block = qwen2()
    layer = MoELayer(moe_config_from_qwen2_moe(hf_cfg, init_std=0.3))
    fresh = randomize(Qwen2MoeSparseMoeBlock(hf_cfg))  # different weights until stored
    store_qwen2_moe_block(layer, fresh)
    assert_block_equal(layer, fresh, x_BSD())
    m_cfg, _ = mixtral()
    m_layer = MoELayer(moe_config_from_mixtral(m_cfg, init_std=0.3))
    m_block = store_mixtral_block(m_layer, randomize(MixtralSparseMoeBlock(m_cfg)))
    assert_block_equal(m_layer, m_block, x_BSD())


def test_gelu_experts_map_to_geglu():
    hf_cfg, block = mixtral(hidden_act="gelu")
    cfg = moe_config_from_mixtral(hf_cfg)
    assert cfg.expert == "geglu"
    assert_block_equal(load_mixtral_block(MoELayer(cfg), block), block, x_BSD())


def test_config_errors():
    hf_cfg, block = mixtral(hidden_act="relu")
    with pytest.raises(ValueError, match=r"hidden_act='relu'"):
        moe_config_from_mixtral(hf_cfg)
    hf_cfg, block = mixtral()
    wrong_width = MoELayer(moe_config_from_mixtral(hf_cfg, d_ff=F + 1))
    with pytest.raises(ValueError, match=r"experts.gate_up_proj has shape \(6, 24, 16\)"):
        load_mixtral_block(wrong_width, block)
    sigmoid = MoELayer(moe_config_from_mixtral(hf_cfg, router="topk_sigmoid"))
    with pytest.raises(ValueError, match=r"router 'topk_sigmoid'"):
        load_mixtral_block(sigmoid, block)
    q_cfg, q_block = qwen2()
    with pytest.raises(ValueError, match=r"no gated shared expert"):
        load_qwen2_moe_block(MoELayer(moe_config_from_qwen3_moe(q_cfg.to_dict() | {"norm_topk_prob": False})), q_block)


def test_aux_loss_coefficient_follows_output_router_logits():
    on, _ = mixtral(output_router_logits=True, router_aux_loss_coef=0.02)
    off, _ = mixtral(router_aux_loss_coef=0.02)
    assert moe_config_from_mixtral(on).aux_loss_coef == pytest.approx(0.02)
    assert moe_config_from_mixtral(off).aux_loss_coef == 0.0

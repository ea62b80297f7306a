"""Mixtral (Jiang et al. 2024, arXiv:2401.04088): GQA attention, every FFN an MoE of
SwiGLU experts, softmax over all experts then top-k, the k weights renormalised.

transformers: MixtralConfig, MixtralForCausalLM, MixtralSparseMoeBlock.
"""

from __future__ import annotations

from typing import Any

import torch

from moekit.models.accounting import Tally
from moekit.models.hf.config import HFLMConfig
from moekit.models.hf.families import blocks
from moekit.models.hf.families.base import (
    HF_FAMILIES,
    Family,
    Names,
    as_dict,
    base_fields,
    get,
    moe_config,
    with_defaults,
)
from moekit.models.hf.families.counting import embed, gqa, heads, req, routed
from moekit.moe.config import MoEConfig
from moekit.moe.layer import MoELayer

# MixtralConfig's defaults of the optional fields read here (tests/test_hf_defaults.py)
DEFAULTS = dict(num_key_value_heads=8, head_dim=None, hidden_act="silu", max_position_embeddings=131072,
                rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None,
                rope_parameters=dict(rope_type="default", rope_theta=1e6),
                router_jitter_noise=0.0, router_aux_loss_coef=0.001, output_router_logits=False)


def mixtral_moe(hf: dict, **overrides: Any) -> MoEConfig:
    hf = with_defaults(hf, DEFAULTS)
    routing = dict(normalize_topk=True, jitter_eps=float(get(hf, "router_jitter_noise", 0.0)))
    return moe_config(hf, "num_local_experts", get(hf, "intermediate_size", required=True),
                      **{**routing, **overrides})


def build(hf: dict, max_seq_len: int | None = None) -> HFLMConfig:
    moe = mixtral_moe(hf)
    hf = with_defaults(hf, DEFAULTS)
    window = get(hf, "sliding_window", 0)
    return HFLMConfig(family="mixtral", moe=moe,
                      **base_fields(hf, max_seq_len, window=True, sliding_window=window or None))


def count(cfg: dict) -> Tally:
    cfg, t = with_defaults(cfg, DEFAULTS), Tally()
    d, h, kv, hd = heads(cfg)
    e, k, f = req(cfg, "num_local_experts"), req(cfg, "num_experts_per_tok"), req(cfg, "intermediate_size")
    for _ in range(req(cfg, "num_hidden_layers")):
        gqa(t, d, h, kv, hd, False, False, cfg.get("sliding_window"))
        t.add("norms", 2 * d, matmul=False)
        routed(t, e, k, 3 * d * f, d * e)
    t.add("norms", d, matmul=False)
    embed(t, cfg, d)
    return t


HF_FAMILIES.register("mixtral")(Family("mixtral", count, build,
                                       Names(moe="block_sparse_moe", expert=("w1", "w3", "w2")),
                                       DEFAULTS))


# ---- one MixtralSparseMoeBlock <-> one MoELayer

def moe_config_from_mixtral(hf_config: Any, **overrides: Any) -> MoEConfig:
    """MixtralConfig (object or dict) -> MoEConfig of one sparse MoE block."""
    return mixtral_moe(as_dict(hf_config), **overrides)


def load_mixtral_block(layer: MoELayer, block: torch.nn.Module) -> MoELayer:
    """Copy a MixtralSparseMoeBlock's weights into layer (in place); returns layer."""
    return blocks.load_routed(layer, block)


def store_mixtral_block(layer: MoELayer, block: torch.nn.Module) -> torch.nn.Module:
    """The other way: write layer's weights into an HF Mixtral (or Qwen3-MoE) block."""
    return blocks.store_routed(layer, block)

"""Qwen3-MoE (Qwen team 2025): RMSNorm on each head of q and k before RoPE (head_dim may
differ from hidden/heads), softmax top-k renormalised only when norm_topk_prob (False
by default, as in transformers), no shared expert.

transformers: Qwen3MoeConfig, Qwen3MoeForCausalLM, Qwen3MoeSparseMoeBlock.
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
    refuse,
    with_defaults,
)
from moekit.models.hf.families.qwen2_moe import count_qwen_moe
from moekit.moe.config import MoEConfig
from moekit.moe.layer import MoELayer

# Qwen3MoeConfig's defaults of the optional fields read here (tests/test_hf_defaults.py)
DEFAULTS = dict(num_key_value_heads=4, hidden_act="silu", max_position_embeddings=32768,
                rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
                sliding_window=4096, rope_parameters=dict(rope_type="default", rope_theta=10000.0),
                attention_bias=False, decoder_sparse_step=1, norm_topk_prob=False,
                mlp_only_layers=None, router_aux_loss_coef=0.001, output_router_logits=False)


def qwen3_moe_moe(hf: dict, **overrides: Any) -> MoEConfig:
    hf = with_defaults(hf, DEFAULTS)
    return moe_config(hf, "num_experts", get(hf, "moe_intermediate_size", required=True),
                      **{"normalize_topk": bool(hf["norm_topk_prob"]), **overrides})


def build(hf: dict, max_seq_len: int | None = None) -> HFLMConfig:
    moe = qwen3_moe_moe(hf)
    hf = with_defaults(hf, DEFAULTS)
    refuse(hf, "mlp_only_layers", lambda v: len(v) == 0, "only decoder_sparse_step is supported")
    bias = bool(hf["attention_bias"])
    return HFLMConfig(family="qwen3_moe", moe=moe, moe_every=get(hf, "decoder_sparse_step", 1),
                      qkv_bias=bias, o_bias=bias, qk_norm="head", **base_fields(hf, max_seq_len))


def count(cfg: dict) -> Tally:
    return count_qwen_moe(with_defaults(cfg, DEFAULTS), qwen3=True)


HF_FAMILIES.register("qwen3_moe")(Family("qwen3_moe", count, build, Names(), DEFAULTS))


# ---- one Qwen3MoeSparseMoeBlock <-> one MoELayer (Mixtral's block layout)

def moe_config_from_qwen3_moe(hf_config: Any, **overrides: Any) -> MoEConfig:
    """Qwen3MoeConfig (object or dict) -> MoEConfig: Qwen2-MoE routing without the shared expert."""
    return qwen3_moe_moe(as_dict(hf_config), **overrides)


def load_qwen3_moe_block(layer: MoELayer, block: torch.nn.Module) -> MoELayer:
    """Copy a Qwen3MoeSparseMoeBlock's weights into layer (in place); returns layer."""
    return blocks.load_routed(layer, block)

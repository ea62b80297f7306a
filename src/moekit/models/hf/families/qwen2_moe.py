"""Qwen2-MoE / Qwen1.5-MoE (Qwen team 2024): q/k/v biases, softmax top-k without
renormalisation unless norm_topk_prob, one shared expert scaled by a per-token sigmoid
gate, MoE every decoder_sparse_step-th layer (the others dense).

transformers: Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen2MoeSparseMoeBlock.
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
from moekit.models.hf.families.counting import embed, gqa, heads, req, routed
from moekit.moe.config import MoEConfig
from moekit.moe.layer import MoELayer

# Qwen2MoeConfig's defaults of the optional fields read here (tests/test_hf_defaults.py)
DEFAULTS = dict(num_key_value_heads=16, hidden_act="silu", max_position_embeddings=32768,
                rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
                sliding_window=4096, rope_parameters=dict(rope_type="default", rope_theta=10000.0),
                decoder_sparse_step=1, shared_expert_intermediate_size=5632, norm_topk_prob=False,
                mlp_only_layers=None, qkv_bias=True, router_aux_loss_coef=0.001,
                output_router_logits=False)


def qwen2_moe_moe(hf: dict, **overrides: Any) -> MoEConfig:
    hf = with_defaults(hf, DEFAULTS)
    fs = get(hf, "shared_expert_intermediate_size", 0)
    kw = dict(normalize_topk=bool(hf["norm_topk_prob"]), num_shared_experts=1 if fs else 0,
              shared_d_ff=fs or None, shared_gate=bool(fs))
    return moe_config(hf, "num_experts", get(hf, "moe_intermediate_size", required=True),
                      **{**kw, **overrides})


def build(hf: dict, max_seq_len: int | None = None) -> HFLMConfig:
    moe = qwen2_moe_moe(hf)
    hf = with_defaults(hf, DEFAULTS)
    refuse(hf, "mlp_only_layers", lambda v: len(v) == 0, "only decoder_sparse_step is supported")
    return HFLMConfig(family="qwen2_moe", moe=moe, moe_every=get(hf, "decoder_sparse_step", 1),
                      qkv_bias=bool(hf["qkv_bias"]), **base_fields(hf, max_seq_len))


def is_moe_layer(cfg: dict, i: int) -> bool:
    """Qwen2-/Qwen3-MoE: layer i is sparse unless listed in mlp_only_layers, every
    decoder_sparse_step-th layer."""
    step = cfg.get("decoder_sparse_step") or 1
    e = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    return i not in (cfg.get("mlp_only_layers") or []) and e > 0 and (i + 1) % step == 0


def count_qwen_moe(cfg: dict, qwen3: bool) -> Tally:
    t = Tally()
    d, h, kv, hd = heads(cfg)
    e, k = req(cfg, "num_experts", "num_local_experts"), req(cfg, "num_experts_per_tok")
    fm, fs = req(cfg, "moe_intermediate_size"), cfg.get("shared_expert_intermediate_size") or 0
    bias = cfg.get("attention_bias") if qwen3 else cfg.get("qkv_bias")
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    for i in range(req(cfg, "num_hidden_layers")):
        gqa(t, d, h, kv, hd, bias, qwen3 and bias, window)
        t.add("norms", 2 * d + (2 * hd if qwen3 else 0), matmul=False)  # Qwen3: q_norm, k_norm
        if not is_moe_layer(cfg, i):
            t.add("dense_mlp", 3 * d * req(cfg, "intermediate_size"))
            continue
        routed(t, e, k, 3 * d * fm, d * e)
        if not qwen3 and fs:  # one fused shared expert with a sigmoid gate (Qwen1.5-MoE)
            t.add("shared_experts", 3 * d * fs + d)
    t.add("norms", d, matmul=False)
    embed(t, cfg, d)
    return t


def count(cfg: dict) -> Tally:
    return count_qwen_moe(with_defaults(cfg, DEFAULTS), qwen3=False)


HF_FAMILIES.register("qwen2_moe")(Family("qwen2_moe", count, build, Names(
    shared="shared_expert", shared_gate="shared_expert_gate"), DEFAULTS))


# ---- one Qwen2MoeSparseMoeBlock <-> one MoELayer

def moe_config_from_qwen2_moe(hf_config: Any, **overrides: Any) -> MoEConfig:
    """Qwen2MoeConfig (object or dict) -> MoEConfig of one sparse block."""
    return qwen2_moe_moe(as_dict(hf_config), **overrides)


def load_qwen2_moe_block(layer: MoELayer, block: torch.nn.Module) -> MoELayer:
    """Copy a Qwen2MoeSparseMoeBlock's weights (routed and shared) into layer."""
    blocks.check_layer(layer)
    blocks.copy_pairs(blocks.routed_pairs(layer, block) + blocks.shared_pairs(layer, block), to_layer=True)
    return layer


@torch.no_grad()
def store_qwen2_moe_block(layer: MoELayer, block: torch.nn.Module) -> torch.nn.Module:
    """Write layer's weights into an HF Qwen2MoeSparseMoeBlock (shared w_in split in two)."""
    blocks.check_layer(layer)
    pairs = blocks.routed_pairs(layer, block) + blocks.shared_pairs(layer, block)
    blocks.copy_pairs(pairs, to_layer=None)  # every shape checked before anything is written
    blocks.copy_pairs(pairs[:3] + pairs[4:], to_layer=False)
    se, w_in = block.shared_expert, layer.shared.ffn.w_in
    Fs = se.gate_proj.weight.shape[0]
    se.gate_proj.weight.copy_(w_in[:Fs])
    se.up_proj.weight.copy_(w_in[Fs:])
    return block

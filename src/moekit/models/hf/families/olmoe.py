"""OLMoE (Muennighoff et al. 2024, arXiv:2409.02060): RMSNorm on the full q and k
projections (width H*d and G*d), optional clamp of q, k, v (clip_qkv), softmax top-k
not renormalised unless norm_topk_prob.

transformers: OlmoeConfig, OlmoeForCausalLM.
"""

from __future__ import annotations

from moekit.models.accounting import Tally
from moekit.models.hf.config import HFLMConfig
from moekit.models.hf.families.base import (
    HF_FAMILIES,
    Family,
    Names,
    base_fields,
    get,
    moe_config,
    with_defaults,
)
from moekit.models.hf.families.counting import embed, gqa, heads, req, routed

# OlmoeConfig's defaults of the optional fields read here (tests/test_hf_defaults.py)
DEFAULTS = dict(num_key_value_heads=None, hidden_act="silu", max_position_embeddings=4096,
                rms_norm_eps=1e-5, tie_word_embeddings=False,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0), attention_bias=False,
                clip_qkv=None, norm_topk_prob=False, router_aux_loss_coef=0.01,
                output_router_logits=False)


def build(hf: dict, max_seq_len: int | None = None) -> HFLMConfig:
    hf = with_defaults(hf, DEFAULTS)
    moe = moe_config(hf, "num_experts", get(hf, "intermediate_size", required=True),
                     normalize_topk=bool(hf["norm_topk_prob"]))
    bias = bool(hf["attention_bias"])
    return HFLMConfig(family="olmoe", moe=moe, qkv_bias=bias, o_bias=bias, qk_norm="full",
                      clip_qkv=hf["clip_qkv"], **base_fields(hf, max_seq_len))


def count(cfg: dict) -> Tally:
    cfg, t = with_defaults(cfg, DEFAULTS), Tally()
    d, h, kv, hd = heads(cfg)
    e, k = req(cfg, "num_experts", "num_local_experts"), req(cfg, "num_experts_per_tok")
    f, bias = req(cfg, "intermediate_size"), cfg["attention_bias"]
    for _ in range(req(cfg, "num_hidden_layers")):
        gqa(t, d, h, kv, hd, bias, bias)
        t.add("norms", 2 * d + h * hd + kv * hd, matmul=False)  # q/k norm on the full width
        routed(t, e, k, 3 * d * f, d * e)
    t.add("norms", d, matmul=False)
    embed(t, cfg, d)
    return t


HF_FAMILIES.register("olmoe")(Family("olmoe", count, build, Names(), DEFAULTS))

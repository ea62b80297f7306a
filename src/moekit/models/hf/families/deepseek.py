"""DeepSeek-V2 (arXiv:2405.04434) and DeepSeek-V3 (arXiv:2412.19437), and Kimi K2 (V3's
architecture and weight names under its own model_type).

    attention   MLA (multi-head latent attention, V2 §2.1): q (optionally) and kv
                compressed to low rank, a decoupled RoPE part (models/attention_mla.py)
    routing     V2: softmax, top-k (group-limited greedy optional, §2.2.2)
                V3: sigmoid + aux-loss-free balancing bias, group-limited (§2.1.2)
    experts     n_shared_experts shared + n_routed_experts routed; the first
                first_k_dense_replace layers dense

transformers: DeepseekV2Config / DeepseekV3Config, DeepseekV{2,3}ForCausalLM.
"""

from __future__ import annotations

from moekit.models.accounting import AttnLayer, Tally
from moekit.models.hf.config import HFLMConfig
from moekit.models.hf.families.base import (
    HF_FAMILIES,
    Family,
    Names,
    base_fields,
    get,
    moe_config,
    refuse,
    with_defaults,
)
from moekit.models.hf.families.counting import embed, req, routed

_COMMON = dict(num_key_value_heads=None, hidden_act="silu", rms_norm_eps=1e-6,
               tie_word_embeddings=False, rope_parameters=dict(rope_type="default", rope_theta=10000.0),
               attention_bias=False, output_router_logits=False)
# DeepseekV2Config's / DeepseekV3Config's defaults of the optional fields read here
# (tests/test_hf_defaults.py)
DEFAULTS_V2 = dict(_COMMON, max_position_embeddings=2048, mlp_bias=False, first_k_dense_replace=0,
                   q_lora_rank=1536, n_group=None, topk_group=None, n_shared_experts=2,
                   routed_scaling_factor=1.0, topk_method="greedy", norm_topk_prob=False)
DEFAULTS_V3 = dict(_COMMON, num_key_value_heads=128, max_position_embeddings=4096,
                   first_k_dense_replace=3, q_lora_rank=1536, n_group=8, topk_group=4,
                   n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                   rope_interleave=True, num_nextn_predict_layers=1)


def _router(hf: dict, v3: bool) -> dict:
    if v3:
        refuse(hf, "scoring_func", lambda v: v == "sigmoid", "DeepSeek-V3 routing is sigmoid")
        refuse(hf, "topk_method", lambda v: v == "noaux_tc", "DeepSeek-V3 routing is noaux_tc")
    else:
        refuse(hf, "scoring_func", lambda v: v == "softmax", "DeepSeek-V2 routing is softmax")
        refuse(hf, "topk_method", lambda v: v in ("greedy", "group_limited_greedy"),
               "valid: greedy, group_limited_greedy")
    grouped = v3 or hf.get("topk_method") == "group_limited_greedy"
    return dict(router="topk_sigmoid" if v3 else "softmax_group_limited",
                normalize_topk=bool(hf["norm_topk_prob"]),
                n_group=get(hf, "n_group", 1) if grouped else 1,
                topk_group=get(hf, "topk_group", 1) if grouped else 1,
                routed_scaling_factor=float(get(hf, "routed_scaling_factor", 1.0)))


def _build(hf: dict, max_seq_len: int | None, v3: bool) -> HFLMConfig:
    hf = with_defaults(hf, DEFAULTS_V3 if v3 else DEFAULTS_V2)
    refuse(hf, "mlp_bias", lambda v: not v, "biases in DeepSeek MLPs are not implemented")
    fm = get(hf, "moe_intermediate_size", required=True)
    ns = get(hf, "n_shared_experts", 0)
    moe = moe_config(hf, "n_routed_experts", fm, num_shared_experts=ns,
                     shared_d_ff=fm if ns else None, **_router(hf, v3))
    base = base_fields(hf, max_seq_len)
    base.update(head_dim=get(hf, "qk_rope_head_dim", required=True), attention="mla",
                n_kv_heads=base["n_heads"])
    return HFLMConfig(
        family="deepseek_v3" if v3 else "deepseek_v2", moe=moe,
        first_k_dense=get(hf, "first_k_dense_replace", 0),
        o_bias=bool(hf["attention_bias"]), q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=get(hf, "kv_lora_rank", required=True),
        qk_nope_head_dim=get(hf, "qk_nope_head_dim", required=True),
        v_head_dim=get(hf, "v_head_dim", required=True),
        # V2 rotates interleaved pairs (complex form); V3 has the rope_interleave switch
        rope_interleave=bool(hf.get("rope_interleave", True)) if v3 else True, **base)


def build_v2(hf: dict, max_seq_len: int | None = None) -> HFLMConfig:
    return _build(hf, max_seq_len, v3=False)


def build_v3(hf: dict, max_seq_len: int | None = None) -> HFLMConfig:
    return _build(hf, max_seq_len, v3=True)


# ---- parameter accounting

def mla_params(cfg: dict, t: Tally | None = None) -> int:
    """Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434 Sec. 2.1)."""
    d, h = req(cfg, "hidden_size"), req(cfg, "num_attention_heads")
    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    ql, kvl, bias = cfg.get("q_lora_rank"), req(cfg, "kv_lora_rank"), cfg["attention_bias"]
    q = d * ql + ql * bias + ql + ql * h * (nope + rope) if ql else d * h * (nope + rope)
    kv = d * (kvl + rope) + (kvl + rope) * bias + kvl + kvl * h * (nope + v)
    n = q + kv + h * v * d + d * bias
    if t is not None:
        t.add("attention", n)
        t.attn.append(AttnLayer(h, nope + rope, v))
    return n


def _moe_params(cfg: dict) -> tuple[int, int, int]:
    """(router, per routed expert, shared experts) parameters of one MoE layer."""
    d, e, fm = cfg["hidden_size"], req(cfg, "n_routed_experts"), req(cfg, "moe_intermediate_size")
    return d * e, 3 * d * fm, 3 * d * fm * (cfg.get("n_shared_experts") or 0)


def _mtp(t: Tally, cfg: dict, block: int) -> None:
    """DeepSeek-V3 report Sec. 2.2: each MTP module = 2 norms + projection (2D->D) + one
    MoE block + a norm; the HF checkpoint also stores its own copies of the embedding
    and output head (README: 671B main + 14B MTP = 685B)."""
    n_mtp, d, v = cfg.get("num_nextn_predict_layers") or 0, cfg["hidden_size"], cfg["vocab_size"]
    if not n_mtp:
        return
    mtp = n_mtp * (2 * d + 2 * d * d + block + d + 2 * v * d)
    t.extra["mtp_params_not_in_total"] = mtp
    t.notes.append(f"{n_mtp} multi-token-prediction module(s) ({mtp / 1e9:.1f}B incl. their "
                   "stored embedding/head copies) are excluded from total and active, as in "
                   "the published 671B; the HF checkpoint holds total + MTP")


def _count(cfg: dict) -> Tally:
    t = Tally()
    d, e, k = req(cfg, "hidden_size"), req(cfg, "n_routed_experts"), req(cfg, "num_experts_per_tok")
    router, per_expert, shared = _moe_params(cfg)
    first_dense, freq = cfg.get("first_k_dense_replace") or 0, cfg.get("moe_layer_freq", 1)
    for i in range(req(cfg, "num_hidden_layers")):
        mla_params(cfg, t)
        t.add("norms", 2 * d, matmul=False)
        if i >= first_dense and i % freq == 0:
            routed(t, e, k, per_expert, router)
            t.add("shared_experts", shared)
        else:
            t.add("dense_mlp", 3 * d * req(cfg, "intermediate_size"))
    t.add("norms", d, matmul=False)
    embed(t, cfg, d)
    _mtp(t, cfg, mla_params(cfg) + 2 * d + router + e * per_expert + shared)
    return t


def count_v2(cfg: dict) -> Tally:
    return _count(with_defaults(cfg, DEFAULTS_V2))


def count_v3(cfg: dict) -> Tally:
    return _count(with_defaults(cfg, DEFAULTS_V3))


_NAMES = Names(shared="shared_experts")
HF_FAMILIES.register("deepseek_v2")(Family("deepseek", count_v2, build_v2, _NAMES, DEFAULTS_V2))
HF_FAMILIES.register("deepseek_v3")(Family("deepseek", count_v3, build_v3, _NAMES, DEFAULTS_V3))
HF_FAMILIES.register("kimi_k2")(Family("deepseek", count_v3, build_v3, _NAMES, DEFAULTS_V3))

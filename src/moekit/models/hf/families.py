"""HF MoE families: config.json -> HFLMConfig, and the names of their weights.

A family is one function (config dict -> HFLMConfig) and one `Names` row in FAMILIES.
Every feature a checkpoint switches on must be either supported here or refused
with a ValueError naming the field: a silently ignored field would load a model
that computes something else.
"""

from __future__ import annotations

from dataclasses import dataclass

import moekit.models.attention_mla  # noqa: F401  (registers "mla")
import moekit.models.hf.attention  # noqa: F401  (registers "hf_gqa")
import moekit.models.hf.routers  # noqa: F401  (registers "softmax_group_limited")
from moekit.models.hf.config import HFLMConfig
from moekit.moe.config import MoEConfig
from moekit.registry import Registry


@dataclass(frozen=True)
class Names:
    """Where a family keeps its MoE weights (under model.layers.{i}.)."""

    moe: str = "mlp"  # the sparse block
    expert: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared: str | None = None  # shared-expert module name
    shared_gate: str | None = None
    router: str = "gate"
    # "per_expert" | "gpt_oss" (fused, transposed, interleaved, biased) | "llama4" (fused, transposed)
    experts_layout: str = "per_expert"
    dense: str = "mlp"  # the dense FFN of non-MoE layers


@dataclass(frozen=True)
class Family:
    build: object  # (hf config dict) -> HFLMConfig
    names: Names


FAMILIES: Registry[Family] = Registry("HF model_type")


def _get(hf: dict, key: str, default=None, *, required: bool = False):
    if required and hf.get(key) is None:
        raise ValueError(f"config.json: field {key!r} is missing (model_type {hf.get('model_type')!r})")
    v = hf.get(key, default)
    return default if v is None else v


def _refuse(hf: dict, key: str, ok, why: str) -> None:
    if key in hf and hf[key] is not None and not ok(hf[key]):
        raise ValueError(f"config.json: {key}={hf[key]!r} is not supported: {why}")


def rope_params(hf: dict) -> tuple[float, dict]:
    """(theta, params) from transformers 5 `rope_parameters` or legacy rope_theta/rope_scaling."""
    p = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = p.get("rope_theta", hf.get("rope_theta", 10000.0))
    p["rope_type"] = p.get("rope_type", p.get("type", "default"))
    if p["rope_type"] not in ("default", "yarn", "llama3"):
        raise ValueError(f"config.json: rope type {p['rope_type']!r} is not supported; "
                         "valid: default, yarn, llama3")
    if p["rope_type"] in ("yarn", "llama3"):
        p.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return float(theta), p


def _base(hf: dict, max_seq_len: int | None, window_ok: bool = False, **kw) -> dict:
    """LMConfig fields every decoder family shares."""
    theta, rope = rope_params(hf)
    _refuse(hf, "quantization_config", lambda v: False,
            "quantized checkpoints (fp8 blocks, mxfp4) are not loaded; dequantize to bf16 first")
    _refuse(hf, "sliding_window", lambda v: window_ok or not hf.get("use_sliding_window", True) or
            v >= (max_seq_len or hf.get("max_position_embeddings", 0)),
            "sliding-window attention is not implemented for this family")
    return dict(
        vocab_size=_get(hf, "vocab_size", required=True), d_model=_get(hf, "hidden_size", required=True),
        n_layers=_get(hf, "num_hidden_layers", required=True),
        n_heads=_get(hf, "num_attention_heads", required=True),
        n_kv_heads=_get(hf, "num_key_value_heads", hf.get("num_attention_heads")),
        head_dim=hf.get("head_dim"), max_seq_len=max_seq_len or min(_get(hf, "max_position_embeddings", 4096), 32768),
        rope_theta=theta, rope=rope, norm_eps=_get(hf, "rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), attention="hf_gqa",
        dense_d_ff=_get(hf, "intermediate_size", required=True), hf_config=dict(hf), **kw)


def _moe(hf: dict, experts_key: str, d_ff: int, **kw) -> MoEConfig:
    _refuse(hf, "hidden_act", lambda v: v == "silu", "only silu (SwiGLU) experts are implemented")
    # transformers 5 writes some families' expert count as num_local_experts
    num = hf.get(experts_key) if hf.get(experts_key) is not None else hf.get("num_local_experts")
    return MoEConfig(d_model=hf["hidden_size"], num_experts=num if num is not None else
                     _get(hf, experts_key, required=True),
                     top_k=_get(hf, "num_experts_per_tok", required=True), d_ff=d_ff, **kw)


def mixtral(hf: dict, max_seq_len: int | None = None) -> HFLMConfig:
    moe = _moe(hf, "num_local_experts", hf.get("intermediate_size"), normalize_topk=True)
    return HFLMConfig(family="mixtral", moe=moe, **_base(hf, max_seq_len))


def qwen2_moe(hf: dict, max_seq_len: int | None = None) -> HFLMConfig:
    _refuse(hf, "mlp_only_layers", lambda v: len(v) == 0, "only decoder_sparse_step is supported")
    fs = _get(hf, "shared_expert_intermediate_size", 0)
    moe = _moe(hf, "num_experts", _get(hf, "moe_intermediate_size", required=True),
               normalize_topk=bool(hf.get("norm_topk_prob", False)),
               num_shared_experts=1 if fs else 0, shared_d_ff=fs or None, shared_gate=bool(fs))
    return HFLMConfig(family="qwen2_moe", moe=moe, moe_every=_get(hf, "decoder_sparse_step", 1),
                      qkv_bias=bool(hf.get("qkv_bias", True)), **_base(hf, max_seq_len))


def qwen3_moe(hf: dict, max_seq_len: int | None = None) -> HFLMConfig:
    _refuse(hf, "mlp_only_layers", lambda v: len(v) == 0, "only decoder_sparse_step is supported")
    moe = _moe(hf, "num_experts", _get(hf, "moe_intermediate_size", required=True),
               normalize_topk=bool(hf.get("norm_topk_prob", True)))
    bias = bool(hf.get("attention_bias", False))
    return HFLMConfig(family="qwen3_moe", moe=moe, moe_every=_get(hf, "decoder_sparse_step", 1),
                      qkv_bias=bias, o_bias=bias, qk_norm="head", **_base(hf, max_seq_len))


def olmoe(hf: dict, max_seq_len: int | None = None) -> HFLMConfig:
    moe = _moe(hf, "num_experts", hf.get("intermediate_size"),
               normalize_topk=bool(hf.get("norm_topk_prob", False)))
    bias = bool(hf.get("attention_bias", False))
    return HFLMConfig(family="olmoe", moe=moe, qkv_bias=bias, o_bias=bias, qk_norm="full",
                      clip_qkv=hf.get("clip_qkv"), **_base(hf, max_seq_len))


def _deepseek_router(hf: dict, v3: bool) -> dict:
    if v3:
        _refuse(hf, "scoring_func", lambda v: v == "sigmoid", "DeepSeek-V3 routing is sigmoid")
        _refuse(hf, "topk_method", lambda v: v == "noaux_tc", "DeepSeek-V3 routing is noaux_tc")
    else:
        _refuse(hf, "scoring_func", lambda v: v == "softmax", "DeepSeek-V2 routing is softmax")
        _refuse(hf, "topk_method", lambda v: v in ("greedy", "group_limited_greedy"),
                "valid: greedy, group_limited_greedy")
    grouped = v3 or hf.get("topk_method") == "group_limited_greedy"
    return dict(router="topk_sigmoid" if v3 else "softmax_group_limited",
                normalize_topk=bool(hf.get("norm_topk_prob", v3)),
                n_group=_get(hf, "n_group", 1) if grouped else 1,
                topk_group=_get(hf, "topk_group", 1) if grouped else 1,
                routed_scaling_factor=float(_get(hf, "routed_scaling_factor", 1.0)))


def _deepseek(hf: dict, max_seq_len: int | None, v3: bool) -> HFLMConfig:
    _refuse(hf, "mlp_bias", lambda v: not v, "biases in DeepSeek MLPs are not implemented")
    fm = _get(hf, "moe_intermediate_size", required=True)
    ns = _get(hf, "n_shared_experts", 0)
    moe = _moe(hf, "n_routed_experts", fm, num_shared_experts=ns, shared_d_ff=fm if ns else None,
               **_deepseek_router(hf, v3))
    base = _base(hf, max_seq_len)
    base.update(head_dim=_get(hf, "qk_rope_head_dim", required=True), attention="mla",
                n_kv_heads=base["n_heads"])
    return HFLMConfig(
        family="deepseek_v3" if v3 else "deepseek_v2", moe=moe, first_k_dense=_get(hf, "first_k_dense_replace", 0),
        o_bias=bool(hf.get("attention_bias", False)), q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=_get(hf, "kv_lora_rank", required=True),
        qk_nope_head_dim=_get(hf, "qk_nope_head_dim", required=True),
        v_head_dim=_get(hf, "v_head_dim", required=True),
        # V2 rotates interleaved pairs (complex form); V3 has the rope_interleave switch
        rope_interleave=bool(hf.get("rope_interleave", True)) if v3 else True, **base)


def deepseek_v2(hf: dict, max_seq_len: int | None = None) -> HFLMConfig:
    return _deepseek(hf, max_seq_len, v3=False)


def deepseek_v3(hf: dict, max_seq_len: int | None = None) -> HFLMConfig:
    return _deepseek(hf, max_seq_len, v3=True)


def gpt_oss(hf: dict, max_seq_len: int | None = None) -> HFLMConfig:
    # router: top-k of the biased logits, softmax over those k (gpt-oss model card §2.1)
    moe = _moe(hf, "num_local_experts", _get(hf, "intermediate_size", required=True),
               softmax_order="after", router_bias=True)
    n, bias = _get(hf, "num_hidden_layers", required=True), bool(hf.get("attention_bias", True))
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                      for i in range(n)]
    return HFLMConfig(family="gpt_oss", moe=moe, qkv_bias=bias, o_bias=bias, attn_sinks=True,
                      sliding_window=hf.get("sliding_window"), layer_types=tuple(types),
                      swiglu_limit=float(_get(hf, "swiglu_limit", 7.0)),
                      swiglu_alpha=float(_get(hf, "swiglu_alpha", 1.702)),
                      **_base(hf, max_seq_len, window_ok=True))


def llama4_text(hf: dict, max_seq_len: int | None = None) -> HFLMConfig:
    n = _get(hf, "num_hidden_layers", required=True)
    step = _get(hf, "interleave_moe_layer_step", 1)
    _refuse(hf, "moe_layers", lambda v: list(v) == list(range(step - 1, n, step)),
            "only the interleave_moe_layer_step pattern is supported")
    every = _get(hf, "no_rope_layer_interval", 4)
    rope_layers = hf.get("no_rope_layers") or [int((i + 1) % every != 0) for i in range(n)]
    types = hf.get("layer_types") or ["chunked_attention" if r else "full_attention" for r in rope_layers]
    f = _get(hf, "intermediate_size", required=True)
    moe = _moe(hf, "num_local_experts", f, router="topk_sigmoid_plain", num_shared_experts=1,
               shared_d_ff=f)
    base = _base(hf, max_seq_len)
    base["dense_d_ff"] = _get(hf, "intermediate_size_mlp", required=True)
    bias = bool(hf.get("attention_bias", False))
    tune = (float(_get(hf, "floor_scale", 8192)), float(_get(hf, "attn_scale", 0.1)))
    return HFLMConfig(
        family="llama4_text", moe=moe, moe_every=step, qkv_bias=bias, o_bias=bias,
        qk_norm="l2" if hf.get("use_qk_norm", True) else "none", rope_interleave=True,
        rope_layers=tuple(rope_layers), layer_types=tuple(types),
        attention_chunk=hf.get("attention_chunk_size"), prescale_experts=True,
        temperature_tuning=tune if hf.get("attn_temperature_tuning", True) else None, **base)


FAMILIES.register("mixtral")(Family(mixtral, Names(moe="block_sparse_moe", expert=("w1", "w3", "w2"))))
FAMILIES.register("qwen2_moe")(Family(qwen2_moe, Names(shared="shared_expert",
                                                       shared_gate="shared_expert_gate")))
FAMILIES.register("qwen3_moe")(Family(qwen3_moe, Names()))
FAMILIES.register("olmoe")(Family(olmoe, Names()))
FAMILIES.register("gpt_oss")(Family(gpt_oss, Names(router="router", experts_layout="gpt_oss")))
FAMILIES.register("llama4_text")(Family(llama4_text, Names(
    moe="feed_forward", router="router", shared="shared_expert", experts_layout="llama4",
    dense="feed_forward")))
FAMILIES.register("deepseek_v2")(Family(deepseek_v2, Names(shared="shared_experts")))
FAMILIES.register("deepseek_v3")(Family(deepseek_v3, Names(shared="shared_experts")))
# Kimi K2 ships DeepSeek-V3's architecture and weight names under its own model_type
FAMILIES.register("kimi_k2")(Family(deepseek_v3, Names(shared="shared_experts")))


def lm_config_from_hf(hf: dict, max_seq_len: int | None = None) -> HFLMConfig:
    """Build the moekit config of an HF config.json dict; unknown model_type -> ValueError."""
    mt = hf.get("model_type")
    if mt == "llama4" and isinstance(hf.get("text_config"), dict):
        raise ValueError("config.json: model_type 'llama4' is the multimodal checkpoint; only the "
                         "text model (model_type 'llama4_text', Llama4ForCausalLM) is supported")
    if mt not in FAMILIES:
        raise ValueError(f"config.json: model_type {mt!r} is not supported; "
                         f"valid: {', '.join(FAMILIES.names())}")
    return FAMILIES.get(mt).build(hf, max_seq_len)

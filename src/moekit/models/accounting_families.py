"""Per-family parameter counters for `accounting.py`, one function per model family.

Each counter walks the layers of a config the way the reference implementation
builds them (transformers' modeling_<family>.py, or the vendor code for Grok-1) and
adds each module's parameters to a `Tally`. The test oracle (tests/test_inspect.py)
checks every HF family against `transformers` built on the meta device.
"""

from __future__ import annotations

from moekit.models.accounting import AttnLayer, Tally
from moekit.registry import Registry

FAMILIES: Registry = Registry("model family")

# config.json `model_type` -> family counter name
MODEL_TYPES = {
    "mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe",
    "olmoe": "olmoe", "deepseek_v2": "deepseek", "deepseek_v3": "deepseek",
    "kimi_k2": "deepseek", "gpt_oss": "gpt_oss", "llama4": "llama4",
    "llama4_text": "llama4", "dbrx": "dbrx", "grok-1": "grok1", "phimoe": "phimoe",
    "jetmoe": "jetmoe", "switch_transformers": "switch",
}


def family_of(cfg: dict) -> tuple[str, str]:
    """(model_type, family). Grok-1's vendor config has no model_type; it is
    recognised by its `model.emb_size` field."""
    mt = cfg.get("model_type")
    if mt is None and isinstance(cfg.get("model"), dict) and "emb_size" in cfg["model"]:
        mt = "grok-1"
    if mt not in MODEL_TYPES:
        raise ValueError(
            f"unknown model_type {mt!r} in config; supported: {', '.join(sorted(MODEL_TYPES))}"
        )
    return mt, MODEL_TYPES[mt]


def _req(cfg: dict, *keys: str):
    """The first of `keys` present in cfg (aliases), else a ValueError naming them."""
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    raise ValueError(f"config field {keys[0]!r} is missing (needed for parameter counting)")


def _embed(t: Tally, cfg: dict, d: int, tied_default: bool = False, head_bias: bool = False):
    v = _req(cfg, "vocab_size")
    t.add("embedding", v * d, matmul=False)
    t.tied = bool(cfg.get("tie_word_embeddings", tied_default))
    if t.tied:
        t.tied_head_matmul = v * d
    else:
        t.add("lm_head", v * d + (v if head_bias else 0))


def _gqa(t: Tally, d: int, h: int, kv: int, hd: int, qkv_bias: bool, o_bias: bool,
         window: int | None = None) -> int:
    n = d * h * hd + 2 * d * kv * hd + h * hd * d
    n += (h * hd + 2 * kv * hd) * qkv_bias + d * o_bias
    t.add("attention", n)
    t.attn.append(AttnLayer(h, hd, hd, window))
    return n


def _routed(t: Tally, e: int, k: int, per_expert: int, router: int, name="routed_experts"):
    t.experts(name, e, k, per_expert)
    t.add("router", router)
    t.num_experts, t.top_k = max(t.num_experts, e), k


def _heads(cfg: dict) -> tuple[int, int, int, int]:
    d, h = _req(cfg, "hidden_size"), _req(cfg, "num_attention_heads")
    kv = cfg.get("num_key_value_heads") or h
    return d, h, kv, cfg.get("head_dim") or d // h


@FAMILIES.register("mixtral")
def mixtral(cfg: dict) -> Tally:
    t = Tally()
    d, h, kv, hd = _heads(cfg)
    e, k, f = _req(cfg, "num_local_experts"), _req(cfg, "num_experts_per_tok"), _req(cfg, "intermediate_size")
    for _ in range(_req(cfg, "num_hidden_layers")):
        _gqa(t, d, h, kv, hd, False, False, cfg.get("sliding_window"))
        t.add("norms", 2 * d, matmul=False)
        _routed(t, e, k, 3 * d * f, d * e)
    t.add("norms", d, matmul=False)
    _embed(t, cfg, d)
    return t


def _qwen_is_moe(cfg: dict, i: int) -> bool:
    step = cfg.get("decoder_sparse_step", 1) or 1
    e = cfg.get("num_experts") or cfg.get("num_local_experts") or 0
    return (i not in (cfg.get("mlp_only_layers") or [])) and e > 0 \
        and (i + 1) % step == 0


def _qwen(cfg: dict, qwen3: bool) -> Tally:
    t = Tally()
    d, h, kv, hd = _heads(cfg)
    e, k = _req(cfg, "num_experts", "num_local_experts"), _req(cfg, "num_experts_per_tok")
    fm, fs = _req(cfg, "moe_intermediate_size"), cfg.get("shared_expert_intermediate_size", 0)
    bias = cfg.get("attention_bias", False) if qwen3 else cfg.get("qkv_bias", True)
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
    for i in range(_req(cfg, "num_hidden_layers")):
        _gqa(t, d, h, kv, hd, bias, qwen3 and bias, window)
        t.add("norms", 2 * d + (2 * hd if qwen3 else 0), matmul=False)  # Qwen3: q_norm, k_norm
        if not _qwen_is_moe(cfg, i):
            t.add("dense_mlp", 3 * d * _req(cfg, "intermediate_size"))
            continue
        _routed(t, e, k, 3 * d * fm, d * e)
        if not qwen3 and fs:  # one fused shared expert with a sigmoid gate (Qwen1.5-MoE)
            t.add("shared_experts", 3 * d * fs + d)
    t.add("norms", d, matmul=False)
    _embed(t, cfg, d)
    return t


@FAMILIES.register("qwen2_moe")
def qwen2_moe(cfg: dict) -> Tally:
    return _qwen(cfg, qwen3=False)


@FAMILIES.register("qwen3_moe")
def qwen3_moe(cfg: dict) -> Tally:
    return _qwen(cfg, qwen3=True)


@FAMILIES.register("olmoe")
def olmoe(cfg: dict) -> Tally:
    t = Tally()
    d, h, kv, hd = _heads(cfg)
    e, k = _req(cfg, "num_experts", "num_local_experts"), _req(cfg, "num_experts_per_tok")
    f, bias = _req(cfg, "intermediate_size"), cfg.get("attention_bias", False)
    for _ in range(_req(cfg, "num_hidden_layers")):
        _gqa(t, d, h, kv, hd, bias, bias)
        t.add("norms", 2 * d + h * hd + kv * hd, matmul=False)  # q/k norm on the full width
        _routed(t, e, k, 3 * d * f, d * e)
    t.add("norms", d, matmul=False)
    _embed(t, cfg, d)
    return t


def _mla(cfg: dict, t: Tally | None = None) -> int:
    """Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434 Sec. 2.1)."""
    d, h = _req(cfg, "hidden_size"), _req(cfg, "num_attention_heads")
    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    ql, kvl, bias = cfg.get("q_lora_rank"), _req(cfg, "kv_lora_rank"), cfg.get("attention_bias", False)
    q = d * ql + ql * bias + ql + ql * h * (nope + rope) if ql else d * h * (nope + rope)
    kv = d * (kvl + rope) + (kvl + rope) * bias + kvl + kvl * h * (nope + v)
    n = q + kv + h * v * d + d * bias
    if t is not None:
        t.add("attention", n)
        t.attn.append(AttnLayer(h, nope + rope, v))
    return n


def _deepseek_moe(cfg: dict) -> tuple[int, int, int]:
    """(router, per routed expert, shared experts) parameters of one MoE layer."""
    d, e, fm = cfg["hidden_size"], _req(cfg, "n_routed_experts"), _req(cfg, "moe_intermediate_size")
    return d * e, 3 * d * fm, 3 * d * fm * (cfg.get("n_shared_experts") or 0)


@FAMILIES.register("deepseek")
def deepseek(cfg: dict) -> Tally:
    t = Tally()
    d, e, k = _req(cfg, "hidden_size"), _req(cfg, "n_routed_experts"), _req(cfg, "num_experts_per_tok")
    router, per_expert, shared = _deepseek_moe(cfg)
    first_dense, freq = cfg.get("first_k_dense_replace", 0), cfg.get("moe_layer_freq", 1)
    for i in range(_req(cfg, "num_hidden_layers")):
        _mla(cfg, t)
        t.add("norms", 2 * d, matmul=False)
        if i >= first_dense and i % freq == 0:
            _routed(t, e, k, per_expert, router)
            t.add("shared_experts", shared)
        else:
            t.add("dense_mlp", 3 * d * _req(cfg, "intermediate_size"))
    t.add("norms", d, matmul=False)
    _embed(t, cfg, d)
    n_mtp = cfg.get("num_nextn_predict_layers") or 0
    if n_mtp:
        # DeepSeek-V3 report Sec. 2.2: each MTP module = 2 norms + projection (2D->D)
        # + one MoE block + a norm; the HF checkpoint also stores its own copies of
        # the embedding and output head (README: 671B main + 14B MTP = 685B).
        block = _mla(cfg) + 2 * d + router + e * per_expert + shared
        v = cfg["vocab_size"]
        mtp = n_mtp * (2 * d + 2 * d * d + block + d + 2 * v * d)
        t.extra["mtp_params_not_in_total"] = mtp
        t.notes.append(f"{n_mtp} multi-token-prediction module(s) ({mtp / 1e9:.1f}B incl. their "
                       "stored embedding/head copies) are excluded from total and active, as in "
                       "the published 671B; the HF checkpoint holds total + MTP")
    return t


@FAMILIES.register("gpt_oss")
def gpt_oss(cfg: dict) -> Tally:
    t = Tally()
    d, h, kv, hd = _heads(cfg)
    e, k, f = _req(cfg, "num_local_experts"), _req(cfg, "num_experts_per_tok"), _req(cfg, "intermediate_size")
    n_layers, bias = _req(cfg, "num_hidden_layers"), cfg.get("attention_bias", True)
    types = cfg.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]
    for i in range(n_layers):
        window = cfg.get("sliding_window") if types[i] == "sliding_attention" else None
        _gqa(t, d, h, kv, hd, bias, bias, window)
        t.add("attention_sinks", h, matmul=False)  # one learned logit per head
        t.add("norms", 2 * d, matmul=False)
        # gate_up_proj (D, 2F) + bias 2F, down_proj (F, D) + bias D; router has a bias
        _routed(t, e, k, d * 2 * f + 2 * f + f * d + d, d * e + e)
    t.add("norms", d, matmul=False)
    _embed(t, cfg, d)
    return t


def _llama4_vision(v: dict, text_d: int) -> int:
    """Llama 4 vision encoder + pixel-shuffle MLP + projector (transformers layout)."""
    w, inter, n = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    patches = (v["image_size"] // v["patch_size"]) ** 2 + 1
    layer = 4 * (w * w + w) + (w * inter + inter) + (inter * w + w) + 2 * 2 * w
    stem = v["num_channels"] * v["patch_size"] ** 2 * w + w + patches * w + 2 * 2 * w
    adapter = inter * v["projector_input_dim"] + v["projector_output_dim"] ** 2
    return n * layer + stem + adapter + v["vision_output_dim"] * text_d


@FAMILIES.register("llama4")
def llama4(cfg: dict) -> Tally:
    text = cfg.get("text_config") or cfg
    t = Tally()
    d, h, kv, hd = _heads(text)
    e, k, f = _req(text, "num_local_experts"), _req(text, "num_experts_per_tok"), _req(text, "intermediate_size")
    n, step = _req(text, "num_hidden_layers"), text.get("interleave_moe_layer_step", 1)
    moe_layers = text.get("moe_layers") or list(range(step - 1, n, step))
    nope_every, chunk = text.get("no_rope_layer_interval", 4), text.get("attention_chunk_size")
    bias = text.get("attention_bias", False)
    for i in range(n):
        # RoPE layers attend within chunks; every 4th (NoPE) layer attends globally.
        window = chunk if (i + 1) % nope_every else None
        _gqa(t, d, h, kv, hd, bias, bias, window)
        t.add("norms", 2 * d, matmul=False)  # qk-norm is a parameter-free L2 norm
        if i in moe_layers:  # routed (gate_up + down) + a shared expert of the same width
            _routed(t, e, k, 3 * d * f, d * e)
            t.add("shared_experts", 3 * d * f)
        else:
            t.add("dense_mlp", 3 * d * _req(text, "intermediate_size_mlp"))
    t.add("norms", d, matmul=False)
    _embed(t, {**text, "tie_word_embeddings": cfg.get("tie_word_embeddings", False)}, d)
    if cfg.get("vision_config"):
        vis = _llama4_vision(cfg["vision_config"], d)
        t.add("vision", vis, active=0)
        t.notes.append(f"total includes the {vis / 1e9:.2f}B vision encoder + projector; "
                       "active counts a text token (vision weights 0)")
    return t


@FAMILIES.register("dbrx")
def dbrx(cfg: dict) -> Tally:
    t = Tally()
    d, h = _req(cfg, "d_model"), _req(cfg, "n_heads")
    attn, ffn = cfg.get("attn_config") or {}, cfg.get("ffn_config") or {}
    kv, hd = attn.get("kv_n_heads", h), d // h
    e, k, f = _req(ffn, "moe_num_experts"), _req(ffn, "moe_top_k"), _req(ffn, "ffn_hidden_size")
    for _ in range(_req(cfg, "n_layers")):
        _gqa(t, d, h, kv, hd, False, False)  # fused Wqkv + out_proj, no biases
        t.add("norms", 2 * d, matmul=False)  # LayerNorm without bias
        _routed(t, e, k, 3 * d * f, d * e)  # w1, v1, w2
    t.add("norms", d, matmul=False)
    _embed(t, cfg, d)
    return t


@FAMILIES.register("grok1")
def grok1(cfg: dict) -> Tally:
    """xai-org/grok-1 model.py: 4 RMSNorms per layer, bias-free, tied InOutEmbed."""
    m, t = cfg["model"], Tally()
    d, h, kv, hd = m["emb_size"], m["num_q_heads"], m["num_kv_heads"], m["key_size"]
    f = int(m["widening_factor"] * d) * 2 // 3
    f += (8 - f) % 8  # model.py ffn_size(): round up to a multiple of 8
    e, k = m["num_experts"], m["num_selected_experts"]
    for _ in range(m["num_layers"]):
        _gqa(t, d, h, kv, hd, False, False)
        t.add("norms", 4 * d, matmul=False)
        _routed(t, e, k, 3 * d * f, d * e)
    t.add("norms", d, matmul=False)
    _embed(t, {"vocab_size": cfg["vocab_size"], "tie_word_embeddings": True}, d)
    return t


@FAMILIES.register("phimoe")
def phimoe(cfg: dict) -> Tally:
    t = Tally()
    d, h, kv, hd = _heads(cfg)
    e, k, f = _req(cfg, "num_local_experts"), _req(cfg, "num_experts_per_tok"), _req(cfg, "intermediate_size")
    bias = cfg.get("attention_bias", False)
    for _ in range(_req(cfg, "num_hidden_layers")):
        _gqa(t, d, h, kv, hd, bias, bias, cfg.get("sliding_window"))
        t.add("norms", 2 * 2 * d, matmul=False)  # LayerNorm with bias
        _routed(t, e, k, 3 * d * f, d * e)
    t.add("norms", 2 * d, matmul=False)
    _embed(t, cfg, d, head_bias=cfg.get("lm_head_bias", False))
    return t


@FAMILIES.register("jetmoe")
def jetmoe(cfg: dict) -> Tally:
    """JetMoE (arXiv:2404.07413): mixture of attention heads + mixture of MLPs."""
    t = Tally()
    d, e = _req(cfg, "hidden_size"), _req(cfg, "num_local_experts", "moe_num_experts")
    k = _req(cfg, "num_experts_per_tok", "moe_top_k")
    f = _req(cfg, "intermediate_size", "ffn_hidden_size")
    kvh, hd = _req(cfg, "num_key_value_heads"), _req(cfg, "kv_channels")
    kvp, glu = kvh * hd, cfg.get("glu", True)
    for _ in range(_req(cfg, "num_hidden_layers", "num_layers")):
        t.add("attention", d * 2 * kvp + d)  # shared kv_proj + output bias
        _routed(t, e, k, 2 * d * kvp, d * e, name="routed_attention_experts")
        t.attn.append(AttnLayer(k * kvh, hd, hd))
        t.add("mlp_bias", d, matmul=False)
        _routed(t, e, k, d * f * (2 if glu else 1) + f * d, d * e)
        t.add("norms", 2 * d, matmul=False)
    t.add("norms", d, matmul=False)
    _embed(t, cfg, d, tied_default=True)
    return t


def _switch_stack(t: Tally, cfg: dict, n: int, step: int, decoder: bool) -> None:
    d, h, dkv, f = cfg["d_model"], cfg["num_heads"], cfg["d_kv"], cfg["d_ff"]
    e, k = cfg["num_experts"], cfg.get("num_selected_experts", 1)
    for i in range(n):
        for _ in range(2 if decoder else 1):  # self-attention (+ cross-attention)
            t.add("attention", 4 * d * h * dkv)
            t.attn.append(AttnLayer(h, dkv, dkv))
        if i == 0:  # T5 relative position bias lives in the first layer only
            t.add("relative_bias", cfg.get("relative_attention_num_buckets", 32) * h, matmul=False)
        t.add("norms", (3 if decoder else 2) * d, matmul=False)
        if i % step == 1 or step == 1:
            _routed(t, e, k, 2 * d * f, d * e + e * cfg.get("router_bias", False))
        else:
            t.add("dense_mlp", 2 * d * f)
    t.add("norms", d, matmul=False)


@FAMILIES.register("switch")
def switch(cfg: dict) -> Tally:
    """Switch Transformer (arXiv:2101.03961): T5 encoder-decoder, every other FFN top-1."""
    t = Tally()
    _switch_stack(t, cfg, cfg["num_layers"], cfg.get("encoder_sparse_step", 1), decoder=False)
    n_dec = cfg.get("num_decoder_layers") or cfg["num_layers"]
    _switch_stack(t, cfg, n_dec, cfg.get("decoder_sparse_step", 1), decoder=True)
    _embed(t, cfg, cfg["d_model"], tied_default=True)
    return t

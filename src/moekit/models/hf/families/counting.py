"""Parameter-counting helpers the family files share (models/accounting.py has the Tally).

Each family's counter walks the layers of a config the way the reference
implementation builds them (transformers' modeling_<family>.py, or the vendor code for
Grok-1) and adds each module's parameters to a Tally. tests/test_inspect.py checks every
counter against transformers' model built on the meta device.
"""

from __future__ import annotations

from moekit.models.accounting import AttnLayer, Tally


def req(cfg: dict, *keys: str):
    """The first of `keys` present in cfg (aliases), else a ValueError naming them."""
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    raise ValueError(f"config field {keys[0]!r} is missing (needed for parameter counting)")


def embed(t: Tally, cfg: dict, d: int, tied_default: bool = False, head_bias: bool = False) -> None:
    v = req(cfg, "vocab_size")
    t.add("embedding", v * d, matmul=False)
    t.tied = bool(cfg.get("tie_word_embeddings", tied_default))
    if t.tied:
        t.tied_head_matmul = v * d
    else:
        t.add("lm_head", v * d + (v if head_bias else 0))


def gqa(t: Tally, d: int, h: int, kv: int, hd: int, qkv_bias: bool, o_bias: bool,
        window: int | None = None) -> int:
    n = d * h * hd + 2 * d * kv * hd + h * hd * d
    n += (h * hd + 2 * kv * hd) * qkv_bias + d * o_bias
    t.add("attention", n)
    t.attn.append(AttnLayer(h, hd, hd, window))
    return n


def routed(t: Tally, e: int, k: int, per_expert: int, router: int, name="routed_experts") -> None:
    t.experts(name, e, k, per_expert)
    t.add("router", router)
    t.num_experts, t.top_k = max(t.num_experts, e), k


def heads(cfg: dict) -> tuple[int, int, int, int]:
    """(hidden size, heads, kv heads, head dim); null kv heads / head dim are derived."""
    d, h = req(cfg, "hidden_size"), req(cfg, "num_attention_heads")
    kv = cfg.get("num_key_value_heads") or h
    return d, h, kv, cfg.get("head_dim") or d // h


def dense_decoder(cfg: dict, qkv_bias: bool, o_bias: bool, head_norm: bool = False,
                  mlp_bias: bool = False, windows: list | None = None) -> Tally:
    """A dense decoder (Llama, Mistral, Qwen2, Qwen3): GQA, SwiGLU MLP, two RMSNorms per
    layer (+ q/k RMSNorm per head), final norm, embedding and head."""
    t = Tally()
    d, h, kv, hd = heads(cfg)
    f = req(cfg, "intermediate_size")
    for i in range(req(cfg, "num_hidden_layers")):
        gqa(t, d, h, kv, hd, qkv_bias, o_bias, windows[i] if windows else None)
        t.add("norms", 2 * d + (2 * hd if head_norm else 0), matmul=False)
        t.add("dense_mlp", 3 * d * f + (2 * f + d) * mlp_bias)
    t.add("norms", d, matmul=False)
    embed(t, cfg, d)
    return t

"""DBRX (Databricks 2024): fused Wqkv + out_proj without biases, LayerNorm without
bias, 16 experts (w1, v1, w2) top-4. Counted by `moekit inspect`, not loaded.

transformers: DbrxConfig, DbrxForCausalLM.
"""

from __future__ import annotations

from moekit.models.accounting import Tally
from moekit.models.hf.families.base import HF_FAMILIES, Family
from moekit.models.hf.families.counting import embed, gqa, req, routed


def count(cfg: dict) -> Tally:
    t = Tally()
    d, h = req(cfg, "d_model"), req(cfg, "n_heads")
    attn, ffn = cfg.get("attn_config") or {}, cfg.get("ffn_config") or {}
    kv, hd = attn.get("kv_n_heads", h), d // h
    e, k, f = req(ffn, "moe_num_experts"), req(ffn, "moe_top_k"), req(ffn, "ffn_hidden_size")
    for _ in range(req(cfg, "n_layers")):
        gqa(t, d, h, kv, hd, False, False)  # fused Wqkv + out_proj, no biases
        t.add("norms", 2 * d, matmul=False)  # LayerNorm without bias
        routed(t, e, k, 3 * d * f, d * e)  # w1, v1, w2
    t.add("norms", d, matmul=False)
    embed(t, cfg, d)
    return t


HF_FAMILIES.register("dbrx")(Family("dbrx", count))

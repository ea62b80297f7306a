"""PhiMoE / Phi-3.5-MoE (Microsoft 2024): LayerNorms with bias, optional attention and
lm_head biases, 16 experts top-2. Counted by `moekit inspect`, not loaded.

transformers: PhimoeConfig, PhimoeForCausalLM.
"""

from __future__ import annotations

from moekit.models.accounting import Tally
from moekit.models.hf.families.base import HF_FAMILIES, Family
from moekit.models.hf.families.counting import embed, gqa, heads, req, routed


def count(cfg: dict) -> Tally:
    t = Tally()
    d, h, kv, hd = heads(cfg)
    e, k, f = req(cfg, "num_local_experts"), req(cfg, "num_experts_per_tok"), req(cfg, "intermediate_size")
    bias = cfg.get("attention_bias", False)
    for _ in range(req(cfg, "num_hidden_layers")):
        gqa(t, d, h, kv, hd, bias, bias, cfg.get("sliding_window"))
        t.add("norms", 2 * 2 * d, matmul=False)  # LayerNorm with bias
        routed(t, e, k, 3 * d * f, d * e)
    t.add("norms", 2 * d, matmul=False)
    embed(t, cfg, d, head_bias=cfg.get("lm_head_bias", False))
    return t


HF_FAMILIES.register("phimoe")(Family("phimoe", count))

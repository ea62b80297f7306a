"""JetMoE (Shen et al. 2024, arXiv:2404.07413): a mixture of attention heads and a
mixture of MLPs. Counted by `moekit inspect`, not loaded.

transformers: JetMoeConfig, JetMoeForCausalLM.
"""

from __future__ import annotations

from moekit.models.accounting import AttnLayer, Tally
from moekit.models.hf.families.base import HF_FAMILIES, Family
from moekit.models.hf.families.counting import embed, req, routed


def count(cfg: dict) -> Tally:
    t = Tally()
    d, e = req(cfg, "hidden_size"), req(cfg, "num_local_experts", "moe_num_experts")
    k = req(cfg, "num_experts_per_tok", "moe_top_k")
    f = req(cfg, "intermediate_size", "ffn_hidden_size")
    kvh, hd = req(cfg, "num_key_value_heads"), req(cfg, "kv_channels")
    kvp, glu = kvh * hd, cfg.get("glu", True)
    for _ in range(req(cfg, "num_hidden_layers", "num_layers")):
        t.add("attention", d * 2 * kvp + d)  # shared kv_proj + output bias
        routed(t, e, k, 2 * d * kvp, d * e, name="routed_attention_experts")
        t.attn.append(AttnLayer(k * kvh, hd, hd))
        t.add("mlp_bias", d, matmul=False)
        routed(t, e, k, d * f * (2 if glu else 1) + f * d, d * e)
        t.add("norms", 2 * d, matmul=False)
    t.add("norms", d, matmul=False)
    embed(t, cfg, d, tied_default=True)
    return t


HF_FAMILIES.register("jetmoe")(Family("jetmoe", count))

"""Grok-1 (xAI 2024, github.com/xai-org/grok-1 model.py): 4 RMSNorms per layer,
bias-free, tied InOutEmbed, 8 experts top-2. Its vendor config has no model_type and
is recognised by its `model.emb_size` field. Counted by `moekit inspect`, not loaded.
"""

from __future__ import annotations

from moekit.models.accounting import Tally
from moekit.models.hf.families.base import HF_FAMILIES, Family
from moekit.models.hf.families.counting import embed, gqa, routed


def count(cfg: dict) -> Tally:
    m, t = cfg["model"], Tally()
    d, h, kv, hd = m["emb_size"], m["num_q_heads"], m["num_kv_heads"], m["key_size"]
    f = int(m["widening_factor"] * d) * 2 // 3
    f += (8 - f) % 8  # model.py ffn_size(): round up to a multiple of 8
    e, k = m["num_experts"], m["num_selected_experts"]
    for _ in range(m["num_layers"]):
        gqa(t, d, h, kv, hd, False, False)
        t.add("norms", 4 * d, matmul=False)
        routed(t, e, k, 3 * d * f, d * e)
    t.add("norms", d, matmul=False)
    embed(t, {"vocab_size": cfg["vocab_size"], "tie_word_embeddings": True}, d)
    return t


HF_FAMILIES.register("grok-1")(Family("grok1", count))

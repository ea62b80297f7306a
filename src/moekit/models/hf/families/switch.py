"""Switch Transformer (Fedus et al. 2021, arXiv:2101.03961): a T5 encoder-decoder whose
every other FFN is a top-1 MoE. Counted by `moekit inspect`, not loaded.

transformers: SwitchTransformersConfig, SwitchTransformersForConditionalGeneration.
"""

from __future__ import annotations

from moekit.models.accounting import AttnLayer, Tally
from moekit.models.hf.families.base import HF_FAMILIES, Family
from moekit.models.hf.families.counting import embed, routed


def _stack(t: Tally, cfg: dict, n: int, step: int, decoder: bool) -> None:
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
            routed(t, e, k, 2 * d * f, d * e + e * cfg.get("router_bias", False))
        else:
            t.add("dense_mlp", 2 * d * f)
    t.add("norms", d, matmul=False)


def count(cfg: dict) -> Tally:
    t = Tally()
    _stack(t, cfg, cfg["num_layers"], cfg.get("encoder_sparse_step", 1), decoder=False)
    n_dec = cfg.get("num_decoder_layers") or cfg["num_layers"]
    _stack(t, cfg, n_dec, cfg.get("decoder_sparse_step", 1), decoder=True)
    embed(t, cfg, cfg["d_model"], tied_default=True)
    return t


HF_FAMILIES.register("switch_transformers")(Family("switch", count))

"""Qwen3 dense (Qwen team 2025, arXiv:2505.09388): a dense decoder, GQA with RMSNorm on
each head of q and k before RoPE (head_dim 128 by default, whatever hidden/heads is),
optional attention biases, SwiGLU MLP, sliding window as Qwen2. Loaded as an MoELM whose
FFNs are all dense.

transformers: Qwen3Config, Qwen3ForCausalLM.
"""

from __future__ import annotations

from moekit.models.accounting import Tally
from moekit.models.hf.config import HFLMConfig
from moekit.models.hf.families.base import (
    HF_FAMILIES,
    Family,
    Names,
    base_fields,
    layer_windows,
    with_defaults,
)
from moekit.models.hf.families.counting import dense_decoder
from moekit.models.hf.families.qwen2 import windows

# Qwen3Config's defaults of the optional fields read here (tests/test_hf_defaults.py)
DEFAULTS = dict(num_key_value_heads=32, head_dim=128, hidden_act="silu", max_position_embeddings=32768,
                rms_norm_eps=1e-6, tie_word_embeddings=False,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0), attention_bias=False,
                use_sliding_window=False, sliding_window=4096, max_window_layers=28, layer_types=None)


def build(hf: dict, max_seq_len: int | None = None) -> HFLMConfig:
    hf = with_defaults(hf, DEFAULTS)
    window, types = layer_windows(hf)
    bias = bool(hf["attention_bias"])
    return HFLMConfig(family="qwen3", moe=None, qkv_bias=bias, o_bias=bias, qk_norm="head",
                      sliding_window=window, layer_types=types,
                      **base_fields(hf, max_seq_len, window=True))


def count(cfg: dict) -> Tally:
    cfg = with_defaults(cfg, DEFAULTS)
    bias = bool(cfg["attention_bias"])
    return dense_decoder(cfg, bias, bias, head_norm=True, windows=windows(cfg))


HF_FAMILIES.register("qwen3")(Family("qwen3", count, build, Names(), DEFAULTS))

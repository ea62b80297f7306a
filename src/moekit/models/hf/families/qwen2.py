"""Qwen2 / Qwen2.5 (Qwen team 2024, arXiv:2407.10671): a dense decoder, GQA with q/k/v
biases (no o bias), SwiGLU MLP, sliding window only with use_sliding_window (on the
layers from max_window_layers on), tied embeddings in the small models. Loaded as an
MoELM whose FFNs are all dense.

transformers: Qwen2Config, Qwen2ForCausalLM.
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

# Qwen2Config's defaults of the optional fields read here (tests/test_hf_defaults.py)
DEFAULTS = dict(num_key_value_heads=32, hidden_act="silu", max_position_embeddings=32768,
                rms_norm_eps=1e-6, tie_word_embeddings=False,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0), use_sliding_window=False,
                sliding_window=4096, max_window_layers=28, layer_types=None)


def build(hf: dict, max_seq_len: int | None = None) -> HFLMConfig:
    hf = with_defaults(hf, DEFAULTS)
    window, types = layer_windows(hf)
    return HFLMConfig(family="qwen2", moe=None, qkv_bias=True, sliding_window=window,
                      layer_types=types, **base_fields(hf, max_seq_len, window=True))


def windows(cfg: dict) -> list | None:
    """Per-layer attention windows for the counters of Qwen2 and Qwen3."""
    window, types = layer_windows(cfg)
    return None if window is None else [window if k == "sliding_attention" else None for k in types]


def count(cfg: dict) -> Tally:
    cfg = with_defaults(cfg, DEFAULTS)
    return dense_decoder(cfg, True, False, windows=windows(cfg))


HF_FAMILIES.register("qwen2")(Family("qwen2", count, build, Names(), DEFAULTS))

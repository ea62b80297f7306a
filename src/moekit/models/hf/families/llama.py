"""Llama (Touvron et al. 2023; Llama 3, Grattafiori et al. 2024): a dense decoder, GQA,
optional attention biases, SwiGLU MLP, llama3 RoPE scaling. Loaded as an MoELM whose
FFNs are all dense (the start of upcycling).

transformers: LlamaConfig, LlamaForCausalLM.
"""

from __future__ import annotations

from moekit.models.accounting import Tally
from moekit.models.hf.config import HFLMConfig
from moekit.models.hf.families.base import (
    HF_FAMILIES,
    Family,
    Names,
    base_fields,
    refuse,
    with_defaults,
)
from moekit.models.hf.families.counting import dense_decoder

# LlamaConfig's defaults of the optional fields read here (tests/test_hf_defaults.py)
DEFAULTS = dict(num_key_value_heads=None, head_dim=None, hidden_act="silu", max_position_embeddings=2048,
                rms_norm_eps=1e-6, tie_word_embeddings=False,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0), attention_bias=False,
                mlp_bias=False)


def build(hf: dict, max_seq_len: int | None = None) -> HFLMConfig:
    hf = with_defaults(hf, DEFAULTS)
    refuse(hf, "mlp_bias", lambda v: not v, "biases in the MLP are not implemented")
    bias = bool(hf["attention_bias"])
    return HFLMConfig(family="llama", moe=None, qkv_bias=bias, o_bias=bias,
                      **base_fields(hf, max_seq_len))


def count(cfg: dict) -> Tally:
    cfg = with_defaults(cfg, DEFAULTS)
    bias = bool(cfg["attention_bias"])
    return dense_decoder(cfg, bias, bias, mlp_bias=bool(cfg["mlp_bias"]))


HF_FAMILIES.register("llama")(Family("llama", count, build, Names(), DEFAULTS))

"""Mistral 7B (Jiang et al. 2023, arXiv:2310.06825): a dense decoder, GQA, sliding-window
attention on every layer (v0.1: 4096 tokens; later versions: none), SwiGLU MLP. Loaded
as an MoELM whose FFNs are all dense.

transformers: MistralConfig, MistralForCausalLM.
"""

from __future__ import annotations

from moekit.models.accounting import Tally
from moekit.models.hf.config import HFLMConfig
from moekit.models.hf.families.base import HF_FAMILIES, Family, Names, base_fields, with_defaults
from moekit.models.hf.families.counting import dense_decoder

# MistralConfig's defaults of the optional fields read here (tests/test_hf_defaults.py)
DEFAULTS = dict(num_key_value_heads=8, head_dim=None, hidden_act="silu", max_position_embeddings=131072,
                rms_norm_eps=1e-6, tie_word_embeddings=False,
                rope_parameters=dict(rope_type="default", rope_theta=10000.0), sliding_window=4096)


def build(hf: dict, max_seq_len: int | None = None) -> HFLMConfig:
    hf = with_defaults(hf, DEFAULTS)
    return HFLMConfig(family="mistral", moe=None, sliding_window=hf["sliding_window"],
                      **base_fields(hf, max_seq_len, window=True))


def count(cfg: dict) -> Tally:
    cfg = with_defaults(cfg, DEFAULTS)
    return dense_decoder(cfg, False, False, windows=[cfg["sliding_window"]] * cfg["num_hidden_layers"])


HF_FAMILIES.register("mistral")(Family("mistral", count, build, Names(), DEFAULTS))

"""HF model families, one file each, all registered in HF_FAMILIES by model_type.

    base.py       Family, Names, the registry, reading config.json, the shared fields
    counting.py   helpers of the parameter counters (models/accounting.py)
    blocks.py     one transformers MoE block <-> one MoELayer (weights)
    <family>.py   DEFAULTS, config.json -> HFLMConfig, weight names, parameter counter,
                  and the family's own experts or block interop where it has them

Loaded and saved (moekit.from_pretrained): mixtral, qwen2_moe, qwen3_moe, olmoe,
deepseek_v2, deepseek_v3, kimi_k2, gpt_oss, llama4_text, and the dense llama, mistral,
qwen2, qwen3 (an MoELM whose FFNs are all dense). Counted only (moekit inspect):
llama4 (multimodal), dbrx, grok-1, phimoe, jetmoe, switch_transformers.
"""

from __future__ import annotations

from moekit.models.hf.config import HFLMConfig
from moekit.models.hf.families import (  # noqa: F401  (imported to register)
    dbrx,
    deepseek,
    gpt_oss,
    grok1,
    jetmoe,
    llama,
    llama4,
    mistral,
    mixtral,
    olmoe,
    phimoe,
    qwen2,
    qwen2_moe,
    qwen3,
    qwen3_moe,
    switch,
)
from moekit.models.hf.families.base import HF_FAMILIES, Family, Names

__all__ = ["HF_FAMILIES", "Family", "Names", "family_of", "lm_config_from_hf", "loadable"]


def loadable() -> list[str]:
    """The model_types moekit.from_pretrained loads."""
    return [n for n in HF_FAMILIES.names() if HF_FAMILIES.get(n).build is not None]


def family_of(cfg: dict) -> tuple[str, Family]:
    """(model_type, Family) of a config.json dict. Grok-1's vendor config has no
    model_type; it is recognised by its `model.emb_size` field."""
    mt = cfg.get("model_type")
    if mt is None and isinstance(cfg.get("model"), dict) and "emb_size" in cfg["model"]:
        mt = "grok-1"
    if mt not in HF_FAMILIES:
        raise ValueError(f"unknown model_type {mt!r} in config; supported: "
                         f"{', '.join(HF_FAMILIES.names())}")
    return mt, HF_FAMILIES.get(mt)


def lm_config_from_hf(hf: dict, max_seq_len: int | None = None) -> HFLMConfig:
    """Build the moekit config of an HF config.json dict; a model_type moekit does not
    load -> ValueError listing those it does."""
    mt = hf.get("model_type")
    family = HF_FAMILIES.get(mt) if mt in HF_FAMILIES else None
    if family is None or family.build is None:
        hint = " (the multimodal checkpoint; the text model is model_type 'llama4_text', " \
               "Llama4ForCausalLM)" if mt == "llama4" else ""
        raise ValueError(f"config.json: model_type {mt!r} is not supported{hint}; "
                         f"valid: {', '.join(loadable())}")
    return family.build(hf, max_seq_len)

"""HFLMConfig: LMConfig plus the per-family attention features of HF MoE checkpoints.

The extra fields only switch features on in the attention variants registered by
`moekit.models.hf.attention` ("hf_gqa") and `moekit.models.attention_mla` ("mla");
the MoE FFNs are plain `MoEConfig`s run by moekit's own MoELayer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import moekit.models.attention_mla  # noqa: F401  (registers attention "mla")
import moekit.models.hf.attention  # noqa: F401  (registers attention "hf_gqa")
from moekit.models.config import LMConfig


def _bad(name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"HFLMConfig.{name}={value!r} is invalid: {allowed}")


@dataclass(frozen=True)
class HFLMConfig(LMConfig):
    family: str = "mixtral"  # model_type in moekit.models.hf.families.HF_FAMILIES
    hf_config: dict[str, Any] = field(default_factory=dict)  # the config.json, kept for saving
    qkv_bias: bool = False  # Qwen2-MoE, GPT-OSS
    o_bias: bool = False  # GPT-OSS
    # "head" (Qwen3: RMSNorm per head) | "full" (OLMoE: over H*d) | "l2" (Llama 4: weightless,
    # after RoPE, RoPE layers only)
    qk_norm: str = "none"
    clip_qkv: float | None = None  # OLMoE: clamp q, k, v to [-c, c]
    attn_sinks: bool = False  # GPT-OSS: a learned per-head logit that takes softmax mass
    sliding_window: int | None = None  # keys within the last `sliding_window` positions
    # per layer "sliding_attention" | "chunked_attention" | "full_attention"
    layer_types: tuple[str, ...] | None = None
    attention_chunk: int | None = None  # Llama 4: chunked layers attend within blocks of this size
    rope_layers: tuple[int, ...] | None = None  # Llama 4: 0 = NoPE layer; None = RoPE everywhere
    temperature_tuning: tuple[float, float] | None = None  # Llama 4 NoPE layers: (floor_scale, attn_scale)
    prescale_experts: bool = False  # Llama 4: experts see score·x (families/llama4.py)
    swiglu_limit: float | None = None  # GPT-OSS experts: clamped SwiGLU (families/gpt_oss.py)
    swiglu_alpha: float = 1.702
    # RoPE: {"rope_type": "default"|"yarn", "factor", "beta_fast", "beta_slow",
    # "original_max_position_embeddings", "mscale", "mscale_all_dim", "truncate", ...}
    rope: dict[str, Any] = field(default_factory=dict)
    rope_interleave: bool = False  # DeepSeek: rotary pairs are (x0, x1), (x2, x3), ...
    # MLA (DeepSeek-V2 §2.1); used when attention == "mla"
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.qk_norm not in ("none", "head", "full", "l2"):
            raise _bad("qk_norm", self.qk_norm, "valid: 'none', 'head', 'full', 'l2'")
        if self.clip_qkv is not None and not self.clip_qkv > 0:
            raise _bad("clip_qkv", self.clip_qkv, "must be None or > 0")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise _bad("sliding_window", self.sliding_window, "must be None or >= 1")
        if self.layer_types is not None and (len(self.layer_types) != self.n_layers or not set(
                self.layer_types) <= {"sliding_attention", "chunked_attention", "full_attention"}):
            raise _bad("layer_types", self.layer_types, f"need {self.n_layers} entries of "
                       "'sliding_attention' / 'chunked_attention' / 'full_attention'")
        if self.rope_layers is not None and len(self.rope_layers) != self.n_layers:
            raise _bad("rope_layers", self.rope_layers, f"need {self.n_layers} entries")
        if self.rope.get("rope_type", "default") not in ("default", "yarn", "llama3"):
            raise _bad("rope", self.rope, "rope_type must be 'default', 'yarn' or 'llama3'")
        if self.attention == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
                if getattr(self, name) <= 0:
                    raise _bad(name, getattr(self, name), "must be > 0 for MLA")
            if self.q_lora_rank is not None and self.q_lora_rank <= 0:
                raise _bad("q_lora_rank", self.q_lora_rank, "must be None or > 0")

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["hf_config"] = dict(self.hf_config)
        return d

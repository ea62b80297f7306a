"""Decoder-only language models: config, attention, norms, RoPE, KV cache, presets."""

from moekit.models.config import LMConfig
from moekit.models.kv_cache import KVCache
from moekit.models.lm import LMOutput, MoELM
from moekit.models.presets import PRESETS, get_preset

__all__ = ["LMConfig", "MoELM", "LMOutput", "KVCache", "PRESETS", "get_preset"]

"""Interoperability with other libraries' MoE modules (transformers blocks)."""

from moekit.interop.hf_blocks import (
    load_mixtral_block,
    load_qwen2_moe_block,
    load_qwen3_moe_block,
    moe_config_from_mixtral,
    moe_config_from_qwen2_moe,
    moe_config_from_qwen3_moe,
    store_mixtral_block,
    store_qwen2_moe_block,
)

__all__ = [
    "load_mixtral_block", "load_qwen2_moe_block", "load_qwen3_moe_block",
    "moe_config_from_mixtral", "moe_config_from_qwen2_moe", "moe_config_from_qwen3_moe",
    "store_mixtral_block", "store_qwen2_moe_block",
]

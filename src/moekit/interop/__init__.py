"""transformers MoE blocks <-> MoELayer (config and weights), one pair per family.

The code lives with the rest of each family's knowledge in models/hf/families/
(mixtral.py, qwen2_moe.py, qwen3_moe.py; blocks.py has the shared weight copying).
"""

from moekit.models.hf.families.mixtral import (
    load_mixtral_block,
    moe_config_from_mixtral,
    store_mixtral_block,
)
from moekit.models.hf.families.qwen2_moe import (
    load_qwen2_moe_block,
    moe_config_from_qwen2_moe,
    store_qwen2_moe_block,
)
from moekit.models.hf.families.qwen3_moe import load_qwen3_moe_block, moe_config_from_qwen3_moe

__all__ = [
    "load_mixtral_block", "load_qwen2_moe_block", "load_qwen3_moe_block",
    "moe_config_from_mixtral", "moe_config_from_qwen2_moe", "moe_config_from_qwen3_moe",
    "store_mixtral_block", "store_qwen2_moe_block",
]

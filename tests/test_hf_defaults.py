"""A config.json field moekit reads but the file leaves out takes transformers' default.

transformers fills an absent field from its config class's __init__ default; moekit
must read the same value, or a hand-written config.json loads as another model in
moekit than in transformers (Qwen3-MoE's norm_topk_prob once defaulted to True here;
transformers says False). Each family's `defaults` are checked against transformers'
config class, and a config.json with only its shapes must give the same moekit config
and parameter count as transformers' fully written-out config of the same shapes.
"""

from __future__ import annotations

import inspect

import pytest

from moekit.interop import moe_config_from_qwen2_moe, moe_config_from_qwen3_moe
from moekit.models.accounting import count_parameters
from moekit.models.hf.families import HF_FAMILIES, lm_config_from_hf

transformers = pytest.importorskip("transformers")

# 16 heads: the families' default kv-head counts (4, 8, 16) divide them
BASE = dict(vocab_size=64, hidden_size=64, num_hidden_layers=4, num_attention_heads=16,
            intermediate_size=24)
MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
           moe_intermediate_size=8, num_experts_per_tok=2)
# the fields moekit requires (shapes), nothing else: every other field is absent
SHAPES = {
    "mixtral": dict(BASE, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8),
    "qwen3_moe": dict(BASE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8),
    "olmoe": dict(BASE, num_experts=4, num_experts_per_tok=2),
    "deepseek_v2": dict(BASE, **MLA, n_routed_experts=4),
    "deepseek_v3": dict(BASE, **MLA, n_routed_experts=16),  # 8 groups (its default) of 2
    "gpt_oss": dict(BASE, num_local_experts=4, num_experts_per_tok=2),
    "llama4_text": dict(BASE, num_local_experts=4, num_experts_per_tok=1, intermediate_size_mlp=40),
    "llama": BASE,
    "mistral": BASE,
    "qwen2": dict(BASE, num_attention_heads=32),  # 32 default kv heads
    "qwen3": dict(BASE, num_attention_heads=32),
}


def _config_class(model_type: str):
    return type(transformers.AutoConfig.for_model(model_type))


def _transformers_default(cls, key: str):
    params = inspect.signature(cls.__init__).parameters
    key = {v: k for k, v in getattr(cls, "attribute_map", {}).items()}.get(key, key)  # aliases
    if key == "rope_parameters":  # None in the signature; the class fills in its own
        return cls().rope_parameters
    assert key in params, f"{cls.__name__} has no field {key!r}"
    return params[key].default


@pytest.mark.parametrize("model_type", sorted(SHAPES))
def test_family_defaults_are_transformers_defaults(model_type):
    cls = _config_class(model_type)
    defaults = HF_FAMILIES.get(model_type).defaults
    assert defaults, f"{model_type} declares no defaults"
    for key, value in defaults.items():
        assert _transformers_default(cls, key) == value, (model_type, key)


@pytest.mark.parametrize("model_type", sorted(SHAPES))
def test_absent_fields_load_as_in_transformers(model_type):
    sparse = {"model_type": model_type, **SHAPES[model_type]}
    full = transformers.AutoConfig.for_model(model_type, **SHAPES[model_type]).to_dict()
    assert len(full) > len(sparse) + 10  # transformers wrote its defaults out
    ours, theirs = lm_config_from_hf(sparse), lm_config_from_hf(full)
    assert ours.replace(hf_config={}) == theirs.replace(hf_config={})
    assert count_parameters(sparse) == count_parameters(full)


def test_qwen3_moe_norm_topk_prob_is_transformers_default():
    want = transformers.Qwen3MoeConfig().norm_topk_prob
    sparse = {"model_type": "qwen3_moe", **SHAPES["qwen3_moe"]}
    assert lm_config_from_hf(sparse).moe.normalize_topk is want
    assert moe_config_from_qwen3_moe(sparse).normalize_topk is want
    assert moe_config_from_qwen3_moe(transformers.Qwen3MoeConfig()).normalize_topk is want


@pytest.mark.parametrize("model_type,to_moe", [("qwen2_moe", moe_config_from_qwen2_moe),
                                               ("qwen3_moe", moe_config_from_qwen3_moe)])
def test_block_config_from_dict_equals_from_transformers_object(model_type, to_moe):
    """The block interop and the model loader read one mapping: a dict and transformers'
    config object of the same fields give the same MoEConfig, and the same as the model's."""
    sparse = {"model_type": model_type, **SHAPES[model_type]}
    obj = transformers.AutoConfig.for_model(model_type, **SHAPES[model_type])
    assert to_moe(sparse) == to_moe(obj) == lm_config_from_hf(sparse).moe

"""Parameter accounting (`moekit inspect`): published totals, transformers parity, errors.

The configs below are written out by hand from public architecture facts (widths,
layers, experts, top-k, vocab); the expected numbers are the published ones, with
their sources. Each must match within 2%.
"""

from __future__ import annotations

import json

import pytest
import torch

from moekit.models.accounting import count_parameters, format_report

B = 1e9

# Mixtral 8x7B -- mistral.ai/news/mixtral-of-experts (2023-12-11): "46.7B total
# parameters but only uses 12.9B parameters per token" (incl. embedding + lm_head).
MIXTRAL_8X7B = dict(model_type="mixtral", hidden_size=4096, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                    num_local_experts=8, num_experts_per_tok=2, vocab_size=32000)
# Mixtral 8x22B -- mistral.ai/news/mixtral-8x22b: "39B active parameters out of 141B".
MIXTRAL_8X22B = dict(MIXTRAL_8X7B, hidden_size=6144, num_hidden_layers=56,
                     num_attention_heads=48, intermediate_size=16384, vocab_size=32768)
# DeepSeek-V3 -- deepseek-ai/DeepSeek-V3 README and arXiv:2412.19437: "671B total
# parameters with 37B activated for each token" (main model, MTP excluded; activated
# counts the output head but not the input embedding).
DEEPSEEK_V3 = dict(model_type="deepseek_v3", hidden_size=7168, num_hidden_layers=61,
                   num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536,
                   kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                   v_head_dim=128, intermediate_size=18432, moe_intermediate_size=2048,
                   n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
                   first_k_dense_replace=3, num_nextn_predict_layers=1, vocab_size=129280)
# Qwen1.5-MoE-A2.7B -- HF model card: "14.3B parameters in total and 2.7B activated".
QWEN15_MOE = dict(model_type="qwen2_moe", hidden_size=2048, num_hidden_layers=24,
                  num_attention_heads=16, num_key_value_heads=16, intermediate_size=5632,
                  moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                  num_experts=60, num_experts_per_tok=4, vocab_size=151936)
# Qwen3-30B-A3B -- HF model card: "30.5B in total and 3.3B activated".
QWEN3_30B = dict(model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48,
                 num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                 intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
                 num_experts_per_tok=8, vocab_size=151936)
# OLMoE-1B-7B -- allenai/OLMoE README: "1.3 billion active and 6.9 billion total".
OLMOE = dict(model_type="olmoe", hidden_size=2048, num_hidden_layers=16,
             num_attention_heads=16, num_key_value_heads=16, intermediate_size=1024,
             num_experts=64, num_experts_per_tok=8, vocab_size=50304)
# gpt-oss-20b -- model card arXiv:2508.10925 Table 1: 20.91B total, 3.61B active
# (active counts the unembedding, not the embedding).
GPT_OSS_20B = dict(model_type="gpt_oss", hidden_size=2880, num_hidden_layers=24,
                   num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                   intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4,
                   vocab_size=201088, sliding_window=128, attention_bias=True)

PUBLISHED = [  # (config, total, active, which active)
    (MIXTRAL_8X7B, 46.7 * B, 12.9 * B, "active"),
    (MIXTRAL_8X22B, 141 * B, 39 * B, "active"),
    (DEEPSEEK_V3, 671 * B, 37 * B, "active_no_embed"),
    (QWEN15_MOE, 14.3 * B, 2.7 * B, "active"),
    (QWEN3_30B, 30.5 * B, 3.3 * B, "active"),
    (OLMOE, 6.9 * B, 1.3 * B, "active"),
    (GPT_OSS_20B, 20.91 * B, 3.61 * B, "active_no_embed"),
]


@pytest.mark.parametrize("cfg,total,active,which", PUBLISHED,
                         ids=lambda v: v["model_type"] if isinstance(v, dict) else "")
def test_published_totals(cfg, total, active, which):
    r = count_parameters(cfg)
    assert r.total == pytest.approx(total, rel=0.02)
    assert getattr(r, which) == pytest.approx(active, rel=0.02)
    assert r.total == r.routed_expert_params + r.shared_expert_params + r.non_expert_params


def test_deepseek_v3_mtp_reported_apart():
    r = count_parameters(DEEPSEEK_V3)
    # README: 685B on the Hub = 671B main model + 14B MTP module.
    assert r.extra["total_with_mtp"] == pytest.approx(685 * B, rel=0.01)
    assert r.extra["total_with_mtp"] - r.total == r.extra["mtp_params_not_in_total"]
    assert any("multi-token" in n for n in r.notes)


def test_flops_and_memory_by_hand():
    # 1 layer, D=4, 2 heads of 2, 4 experts of F=3, top-1, vocab 10, untied.
    cfg = dict(model_type="mixtral", hidden_size=4, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=2, intermediate_size=3,
               num_local_experts=4, num_experts_per_tok=1, vocab_size=10)
    r = count_parameters(cfg, context_len=7)
    attn, router, expert, emb = 4 * 16, 4 * 4, 3 * 4 * 3, 10 * 4
    norms = 2 * 4 + 4
    assert r.total == attn + router + 4 * expert + 2 * emb + norms
    assert r.active == attn + router + expert + 2 * emb + norms
    assert r.active_no_embed == r.active - emb
    # matmuls: attention, router, one expert, lm_head; attention: 2*H*(dqk+dv)*L
    assert r.matmul_flops_per_token == 2 * (attn + router + expert + emb)
    assert r.attention_flops_per_token == 2 * 2 * (2 + 2) * 7
    assert r.memory_gb["bf16"] == pytest.approx(r.total * 2 / 1e9)
    assert r.memory_gb["int4"] == pytest.approx(r.total * 0.5 / 1e9)


def test_sliding_window_caps_attention_flops():
    full = count_parameters(dict(GPT_OSS_20B, sliding_window=None), context_len=4096)
    slid = count_parameters(GPT_OSS_20B, context_len=4096)
    # half of the 24 layers slide over 128 tokens instead of 4096
    per_layer = 2 * 64 * (64 + 64)
    assert full.attention_flops_per_token - slid.attention_flops_per_token == \
        12 * per_layer * (4096 - 128)


def test_tied_embedding_is_still_the_unembedding():
    r = count_parameters(dict(MIXTRAL_8X7B, tie_word_embeddings=True))
    assert r.active_no_embed == r.active
    assert r.matmul_flops_per_token == count_parameters(MIXTRAL_8X7B).matmul_flops_per_token


def test_unknown_model_type_lists_supported():
    with pytest.raises(ValueError, match="unknown model_type 'bert'.*mixtral.*qwen3_moe"):
        count_parameters({"model_type": "bert"})


def test_missing_field_is_named():
    cfg = {k: v for k, v in MIXTRAL_8X7B.items() if k != "num_local_experts"}
    with pytest.raises(ValueError, match="num_local_experts"):
        count_parameters(cfg)


# ---- exact parity with transformers, built on the meta device (tiny configs) ----

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=24, vocab_size=50)
HF_TINY = {
    "mixtral": dict(TINY, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                      shared_expert_intermediate_size=16, decoder_sparse_step=2),
    "qwen3_moe": dict(TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                      head_dim=16, mlp_only_layers=[0]),
    "olmoe": dict(TINY, num_experts=4, num_experts_per_tok=2),
    "deepseek_v2": dict(TINY, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                        n_shared_experts=2, first_k_dense_replace=1, q_lora_rank=None,
                        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                        num_key_value_heads=4, n_group=1, topk_group=1),
    "deepseek_v3": dict(TINY, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                        n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=12,
                        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                        num_key_value_heads=4, n_group=2, topk_group=1, attention_bias=True),
    "gpt_oss": dict(TINY, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                    sliding_window=4),
    "llama4_text": dict(TINY, num_local_experts=4, num_experts_per_tok=1, head_dim=8,
                        intermediate_size_mlp=40, interleave_moe_layer_step=2),
    "phimoe": dict(TINY, num_local_experts=4, num_experts_per_tok=2, attention_bias=True,
                   lm_head_bias=True),
    "jetmoe": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, kv_channels=8, intermediate_size=24,
                   num_local_experts=4, num_experts_per_tok=2, vocab_size=50),
    "dbrx": dict(d_model=32, n_heads=4, n_layers=2, vocab_size=50,
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0), ffn_config=dict(ffn_hidden_size=24,
                                                                 moe_num_experts=4, moe_top_k=2)),
    "llama": dict(TINY, attention_bias=True, mlp_bias=True, head_dim=16),
    "mistral": dict(TINY, sliding_window=4),
    "qwen2": dict(TINY, tie_word_embeddings=True),
    "qwen3": dict(TINY, attention_bias=True, head_dim=16),
    "switch_transformers": dict(d_model=32, d_kv=8, d_ff=24, num_heads=4, num_layers=4,
                                num_decoder_layers=4, num_experts=4, vocab_size=50,
                                encoder_sparse_step=2, decoder_sparse_step=2),
}


def _meta_count(model_type: str, fields: dict) -> tuple[int, int]:
    """(total params, params under an `.experts.` module) of transformers' model."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cfg = AutoConfig.for_model(model_type, **fields)
    auto = AutoModelForSeq2SeqLM if model_type == "switch_transformers" else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(cfg)
    named = list(model.named_parameters())
    return sum(p.numel() for _, p in named), sum(p.numel() for n, p in named if ".experts." in n)


@pytest.mark.parametrize("model_type", sorted(HF_TINY))
def test_matches_transformers_meta_model(model_type):
    total, experts = _meta_count(model_type, HF_TINY[model_type])
    r = count_parameters({"model_type": model_type, **HF_TINY[model_type]})
    assert r.total == total
    if model_type not in ("jetmoe", "dbrx", "switch_transformers"):  # other module names
        assert r.routed_expert_params == experts


def test_llama4_multimodal_matches_transformers():
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    vision = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                  num_attention_heads=2, image_size=28, patch_size=14, projector_input_dim=8,
                  projector_output_dim=8, vision_output_dim=8, pixel_shuffle_ratio=0.5)
    text = dict(HF_TINY["llama4_text"], model_type="llama4_text")
    cfg = Llama4Config(text_config=text, vision_config=vision)
    with torch.device("meta"):
        total = sum(p.numel() for p in Llama4ForConditionalGeneration(cfg).parameters())
    r = count_parameters({"model_type": "llama4", "text_config": text, "vision_config":
                          {**vision, "num_channels": 3}})
    assert r.total == total
    text_only = count_parameters(text)
    assert r.parts[-1].name == "vision" and r.total == text_only.total + r.parts[-1].params
    assert r.active == text_only.active  # a text token touches no vision weight


def test_cli_inspect(tmp_path):
    from typer.testing import CliRunner

    from moekit.cli.main import app

    (tmp_path / "config.json").write_text(json.dumps(MIXTRAL_8X7B))
    out = CliRunner().invoke(app, ["inspect", str(tmp_path), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["total"] == count_parameters(MIXTRAL_8X7B).total
    text = CliRunner().invoke(app, ["inspect", str(tmp_path / "config.json")])
    assert "46.70B" in text.output and format_report(count_parameters(MIXTRAL_8X7B)) in text.output
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nope"}))
    bad = CliRunner().invoke(app, ["inspect", str(tmp_path)])
    assert bad.exit_code == 2 and "supported" in bad.output

"""Llama 4 text model (Meta 2025; transformers Llama4TextConfig / Llama4ForCausalLM).

    attention   interleaved RoPE; every no_rope_layer_interval-th layer is NoPE with
                attention-temperature tuning (arXiv:2501.19399); weightless L2 q/k norm
                after RoPE; RoPE layers attend within chunks of attention_chunk_size
    MoE         every interleave_moe_layer_step-th layer: routed top-k with each
                weight σ(logit) on its own, plus a shared expert of the same width; the
                routing score scales the token *before* the expert (below)
    dense       the other layers, of width intermediate_size_mlp

The multimodal checkpoint (model_type "llama4") is counted (vision tower included) but
not loaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.models.accounting import Tally
from moekit.models.hf.config import HFLMConfig
from moekit.models.hf.families.base import (
    HF_FAMILIES,
    Family,
    Names,
    base_fields,
    get,
    moe_config,
    refuse,
    with_defaults,
)
from moekit.models.hf.families.counting import embed, gqa, heads, req, routed
from moekit.moe.types import DispatchPlan
from moekit.ops.sort import permute, unpermute

# Llama4TextConfig's defaults of the optional fields read here (tests/test_hf_defaults.py)
DEFAULTS = dict(num_key_value_heads=8, head_dim=128, hidden_act="silu", max_position_embeddings=131072,
                rms_norm_eps=1e-5, tie_word_embeddings=False,
                rope_parameters=dict(rope_type="default", rope_theta=500000.0), moe_layers=None,
                interleave_moe_layer_step=1, use_qk_norm=True, no_rope_layers=None,
                no_rope_layer_interval=4, attention_chunk_size=8192, layer_types=None,
                attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1,
                attention_bias=False, router_aux_loss_coef=0.001, output_router_logits=False)


def _rope_layers(hf: dict, n: int) -> list[int]:
    every = get(hf, "no_rope_layer_interval", 4)
    return hf.get("no_rope_layers") or [int((i + 1) % every != 0) for i in range(n)]


def build(hf: dict, max_seq_len: int | None = None) -> HFLMConfig:
    hf = with_defaults(hf, DEFAULTS)
    refuse(hf, "hidden_act", lambda v: v == "silu", "this family's experts are SiLU-gated")
    n = get(hf, "num_hidden_layers", required=True)
    step = get(hf, "interleave_moe_layer_step", 1)
    refuse(hf, "moe_layers", lambda v: list(v) == list(range(step - 1, n, step)),
           "only the interleave_moe_layer_step pattern is supported")
    rope_layers = _rope_layers(hf, n)
    types = hf.get("layer_types") or ["chunked_attention" if r else "full_attention" for r in rope_layers]
    f = get(hf, "intermediate_size", required=True)
    moe = moe_config(hf, "num_local_experts", f, router="topk_sigmoid_plain", num_shared_experts=1,
                     shared_d_ff=f)
    base = base_fields(hf, max_seq_len)
    base["dense_d_ff"] = get(hf, "intermediate_size_mlp", required=True)
    bias = bool(hf["attention_bias"])
    tune = (float(get(hf, "floor_scale", 8192)), float(get(hf, "attn_scale", 0.1)))
    return HFLMConfig(
        family="llama4_text", moe=moe, moe_every=step, qkv_bias=bias, o_bias=bias,
        qk_norm="l2" if hf["use_qk_norm"] else "none", rope_interleave=True,
        rope_layers=tuple(rope_layers), layer_types=tuple(types),
        attention_chunk=hf.get("attention_chunk_size"), prescale_experts=True,
        temperature_tuning=tune if hf["attn_temperature_tuning"] else None, **base)


# ---- parameter accounting

def _vision(v: dict, text_d: int) -> int:
    """Llama 4 vision encoder + pixel-shuffle MLP + projector (transformers layout)."""
    w, inter, n = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"]
    patches = (v["image_size"] // v["patch_size"]) ** 2 + 1
    layer = 4 * (w * w + w) + (w * inter + inter) + (inter * w + w) + 2 * 2 * w
    stem = v["num_channels"] * v["patch_size"] ** 2 * w + w + patches * w + 2 * 2 * w
    adapter = inter * v["projector_input_dim"] + v["projector_output_dim"] ** 2
    return n * layer + stem + adapter + v["vision_output_dim"] * text_d


def count(cfg: dict) -> Tally:
    text, t = with_defaults(cfg.get("text_config") or cfg, DEFAULTS), Tally()
    d, h, kv, hd = heads(text)
    e, k, f = req(text, "num_local_experts"), req(text, "num_experts_per_tok"), req(text, "intermediate_size")
    n, step = req(text, "num_hidden_layers"), text["interleave_moe_layer_step"]
    moe_layers = text.get("moe_layers") or list(range(step - 1, n, step))
    for i, rope in enumerate(_rope_layers(text, n)):
        # RoPE layers attend within chunks; NoPE layers attend globally
        gqa(t, d, h, kv, hd, text["attention_bias"], text["attention_bias"],
            text.get("attention_chunk_size") if rope else None)
        t.add("norms", 2 * d, matmul=False)  # qk-norm is a parameter-free L2 norm
        if i in moe_layers:  # routed (gate_up + down) + a shared expert of the same width
            routed(t, e, k, 3 * d * f, d * e)
            t.add("shared_experts", 3 * d * f)
        else:
            t.add("dense_mlp", 3 * d * req(text, "intermediate_size_mlp"))
    t.add("norms", d, matmul=False)
    embed(t, {**text, "tie_word_embeddings": cfg.get("tie_word_embeddings", False)}, d)
    if cfg.get("vision_config"):
        vis = _vision(cfg["vision_config"], d)
        t.add("vision", vis, active=0)
        t.notes.append(f"total includes the {vis / 1e9:.2f}B vision encoder + projector; "
                       "active counts a text token (vision weights 0)")
    return t


_NAMES = Names(moe="feed_forward", router="router", shared="shared_expert", experts_layout="llama4",
               dense="feed_forward")
HF_FAMILIES.register("llama4_text")(Family("llama4", count, build, _NAMES, DEFAULTS))
HF_FAMILIES.register("llama4")(Family("llama4", count))  # multimodal: counted, not loaded


class PrescaledSwiGLUExperts(nn.Module):
    """expert(s·x) with s = σ(router logit), not s·expert(x); with a SwiGLU expert the two
    differ. Same contract as ExpertBank (forward(x_TD, plan) -> y_TD, combine included);
    HF's fused gate_up_proj (E, D, 2F) is stored here as moekit's w_in (E, 2F, D) = [gate | up]."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, init_std: float = 0.02) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(num_experts, 2 * d_ff, d_model) * init_std)
        self.w_out = nn.Parameter(torch.randn(num_experts, d_model, d_ff) * init_std)

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan, backend: str | None = None) -> torch.Tensor:
        rows_RD = permute(x_TD, plan.token_idx_R) * plan.weights_R.to(x_TD.dtype)[:, None]
        outs, start = [], 0
        for e, count in enumerate(plan.counts_E.tolist()):
            g_nF, u_nF = (rows_RD[start : start + count] @ self.w_in[e].t()).chunk(2, dim=-1)
            outs.append((F.silu(g_nF) * u_nF) @ self.w_out[e].t())
            start += count
        out_RD = torch.cat(outs) if outs else rows_RD
        return unpermute(out_RD, plan.token_idx_R, plan.num_tokens)

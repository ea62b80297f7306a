"""GPT-OSS (OpenAI 2025, gpt-oss model card arXiv:2508.10925 §2.1).

    attention   q/k/v/o biases, sliding window on alternate layers, attention sinks
                (a learned logit per head joins each softmax; hf/attention.py)
    routing     top-k of the biased router logits, softmax over those k
    experts     biased, clamped SwiGLU (below); the checkpoint fuses and interleaves
                gate and up: h = x W_inᵀ + b_in, [g | u] = h
                    g = min(g, limit),  u = clamp(u, -limit, limit)
                    a = (u + 1) · g · σ(α g)        α = 1.702
                    y = a W_outᵀ + b_out

transformers: GptOssConfig, GptOssForCausalLM.
"""

from __future__ import annotations

import torch
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

_YARN = dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
             truncate=False, original_max_position_embeddings=4096)
# GptOssConfig's defaults of the optional fields read here (tests/test_hf_defaults.py)
DEFAULTS = dict(head_dim=64, num_key_value_heads=8, sliding_window=128, tie_word_embeddings=False,
                hidden_act="silu", max_position_embeddings=131072, rms_norm_eps=1e-5,
                rope_parameters=_YARN, swiglu_alpha=1.702, swiglu_limit=7.0,
                router_aux_loss_coef=0.001, output_router_logits=False, layer_types=None,
                attention_bias=True)


def _layer_types(hf: dict) -> list[str]:
    n = get(hf, "num_hidden_layers", required=True)
    return hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                     for i in range(n)]


def build(hf: dict, max_seq_len: int | None = None) -> HFLMConfig:
    hf = with_defaults(hf, DEFAULTS)
    refuse(hf, "hidden_act", lambda v: v == "silu", "this family's experts are SiLU-gated")
    # router: top-k of the biased logits, softmax over those k
    moe = moe_config(hf, "num_local_experts", get(hf, "intermediate_size", required=True),
                     softmax_order="after", router_bias=True)
    bias = bool(hf["attention_bias"])
    return HFLMConfig(family="gpt_oss", moe=moe, qkv_bias=bias, o_bias=bias, attn_sinks=True,
                      sliding_window=hf.get("sliding_window"), layer_types=tuple(_layer_types(hf)),
                      swiglu_limit=float(get(hf, "swiglu_limit", 7.0)),
                      swiglu_alpha=float(get(hf, "swiglu_alpha", 1.702)),
                      **base_fields(hf, max_seq_len, window=True))


def count(cfg: dict) -> Tally:
    cfg, t = with_defaults(cfg, DEFAULTS), Tally()
    d, h, kv, hd = heads(cfg)
    e, k, f = req(cfg, "num_local_experts"), req(cfg, "num_experts_per_tok"), req(cfg, "intermediate_size")
    bias = cfg["attention_bias"]
    for kind in _layer_types(cfg):
        window = cfg.get("sliding_window") if kind == "sliding_attention" else None
        gqa(t, d, h, kv, hd, bias, bias, window)
        t.add("attention_sinks", h, matmul=False)  # one learned logit per head
        t.add("norms", 2 * d, matmul=False)
        # gate_up_proj (D, 2F) + bias 2F, down_proj (F, D) + bias D; router has a bias
        routed(t, e, k, d * 2 * f + 2 * f + f * d + d, d * e + e)
    t.add("norms", d, matmul=False)
    embed(t, cfg, d)
    return t


HF_FAMILIES.register("gpt_oss")(Family("gpt_oss", count, build,
                                       Names(router="router", experts_layout="gpt_oss"),
                                       DEFAULTS))


class ClampedSwiGLUExperts(nn.Module):
    """Same contract as ExpertBank: forward(x_TD, plan) runs every expert on its rows and
    combines them with the routing weights. A loop over experts (the biases keep it off
    the fused bias-free path); it is both the implementation and its own oracle."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, limit: float = 7.0,
                 alpha: float = 1.702, init_std: float = 0.02) -> None:
        super().__init__()
        self.limit, self.alpha = limit, alpha
        self.w_in = nn.Parameter(torch.randn(num_experts, 2 * d_ff, d_model) * init_std)
        self.b_in = nn.Parameter(torch.zeros(num_experts, 2 * d_ff))
        self.w_out = nn.Parameter(torch.randn(num_experts, d_model, d_ff) * init_std)
        self.b_out = nn.Parameter(torch.zeros(num_experts, d_model))

    def act(self, h_nN: torch.Tensor) -> torch.Tensor:
        g, u = h_nN.chunk(2, dim=-1)
        g, u = g.clamp(max=self.limit), u.clamp(-self.limit, self.limit)
        return (u + 1) * g * torch.sigmoid(g * self.alpha)

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan, backend: str | None = None) -> torch.Tensor:
        rows_RD = permute(x_TD, plan.token_idx_R)
        outs, start = [], 0
        for e, count in enumerate(plan.counts_E.tolist()):
            r_nD = rows_RD[start : start + count]
            h_nN = torch.addmm(self.b_in[e], r_nD, self.w_in[e].t())
            outs.append(torch.addmm(self.b_out[e], self.act(h_nN), self.w_out[e].t()))
            start += count
        out_RD = torch.cat(outs) if outs else rows_RD
        return unpermute(out_RD, plan.token_idx_R, plan.num_tokens, plan.weights_R)


def deinterleave(t: torch.Tensor) -> torch.Tensor:
    """(..., 2F) with g, u alternating -> (..., 2F) = [g | u]."""
    return torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)


def interleave(t: torch.Tensor) -> torch.Tensor:
    """The inverse of deinterleave."""
    g, u = t.chunk(2, dim=-1)
    return torch.stack([g, u], dim=-1).flatten(-2)

"""Attention "hf_gqa": GQA with the per-family switches of HF MoE checkpoints.

    Qwen2-MoE   q/k/v biases
    Qwen3-MoE   RMSNorm on each head of q and k before RoPE (head_dim may differ from D/H)
    OLMoE       RMSNorm on the full q and k projections (width H*d and G*d), optional
                clamp of q, k, v (clip_qkv)
Projection and norm names follow transformers (q_proj, ..., q_norm, k_norm), so
checkpoints map one to one.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.models.attention import ATTENTIONS, GroupedQueryAttention
from moekit.models.norm import RMSNorm
from moekit.models.rope import apply_rope


@ATTENTIONS.register("hf_gqa")
class HFGroupedQueryAttention(GroupedQueryAttention):
    def __init__(self, cfg, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        D, H, G, d = cfg.d_model, self.n_heads, self.n_kv_heads, self.head_dim
        self.q_proj = nn.Linear(D, H * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(D, G * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(D, G * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(H * d, D, bias=cfg.o_bias)
        self.qk_norm, self.clip = cfg.qk_norm, cfg.clip_qkv
        if cfg.qk_norm != "none":
            q_w, k_w = (d, d) if cfg.qk_norm == "head" else (H * d, G * d)
            self.q_norm, self.k_norm = RMSNorm(q_w, cfg.norm_eps), RMSNorm(k_w, cfg.norm_eps)

    def _project(self, x_BSD: torch.Tensor):
        q, k, v = self.q_proj(x_BSD), self.k_proj(x_BSD), self.v_proj(x_BSD)
        if self.qk_norm == "full":  # OLMoE: before the head split
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        B, S, _ = x_BSD.shape
        q_BHSd = q.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k_BGSd = k.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v_BGSd = v.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":  # Qwen3: per head, on head_dim
            q_BHSd, k_BGSd = self.q_norm(q_BHSd), self.k_norm(k_BGSd)
        return q_BHSd, k_BGSd, v_BGSd

    def forward(self, x_BSD, rope, kv_cache=None):
        B, S, _ = x_BSD.shape
        q_BHSd, k_BGSd, v_BGSd = self._project(x_BSD)
        q_BHSd, k_BGSd = apply_rope(q_BHSd, rope), apply_rope(k_BGSd, rope)
        if kv_cache is not None:
            k_BGSd, v_BGSd = kv_cache.update(self.layer_idx, k_BGSd, v_BGSd)
        y_BHSd = self._attend(q_BHSd, k_BGSd, v_BGSd)
        return self.o_proj(y_BHSd.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))

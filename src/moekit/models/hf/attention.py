"""Attention "hf_gqa": GQA with the per-family switches of HF MoE checkpoints.

    Qwen2-MoE   q/k/v biases
    Qwen3-MoE   RMSNorm on each head of q and k before RoPE (head_dim may differ from D/H)
    OLMoE       RMSNorm on the full q and k projections (width H*d and G*d), optional
                clamp of q, k, v (clip_qkv)
    GPT-OSS     biases, sliding-window layers, attention sinks: a learned logit per head
                joins each softmax and takes mass without a value (Xiao et al. 2023,
                "Efficient Streaming Language Models with Attention Sinks")
Projection and norm names follow transformers (q_proj, ..., q_norm, k_norm), so
checkpoints map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
        sliding = cfg.layer_types is None or cfg.layer_types[layer_idx] == "sliding_attention"
        self.window = cfg.sliding_window if sliding else None
        self.sinks = nn.Parameter(torch.zeros(H)) if cfg.attn_sinks else None

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

    def _attend(self, q_BHSd, k_BGLd, v_BGLd) -> torch.Tensor:
        if self.sinks is None and self.window is None:
            return super()._attend(q_BHSd, k_BGLd, v_BGLd)
        return self._attend_eager(q_BHSd, k_BGLd, v_BGLd)

    def _attend_eager(self, q_BHSd, k_BGLd, v_BGLd) -> torch.Tensor:
        """Softmax attention written out: the window is a mask, the sink one more column."""
        S, L, rep = q_BHSd.shape[2], k_BGLd.shape[2], self.n_heads // self.n_kv_heads
        k_BHLd, v_BHLd = k_BGLd.repeat_interleave(rep, 1), v_BGLd.repeat_interleave(rep, 1)
        scores_BHSL = (q_BHSd @ k_BHLd.transpose(-1, -2)) * self.head_dim ** -0.5
        q_pos_S1 = torch.arange(L - S, L, device=q_BHSd.device)[:, None]
        k_pos_1L = torch.arange(L, device=q_BHSd.device)[None, :]
        allowed_SL = k_pos_1L <= q_pos_S1
        if self.window is not None:
            allowed_SL = allowed_SL & (q_pos_S1 - k_pos_1L < self.window)
        scores_BHSL = scores_BHSL.masked_fill(~allowed_SL, float("-inf"))
        if self.sinks is not None:
            B, H = scores_BHSL.shape[:2]
            sink_BHS1 = self.sinks.view(1, H, 1, 1).expand(B, H, S, 1).to(scores_BHSL.dtype)
            probs = F.softmax(torch.cat([scores_BHSL, sink_BHS1], dim=-1).float(), dim=-1)
            probs_BHSL = probs[..., :-1].to(v_BHLd.dtype)  # the sink's share is dropped
        else:
            probs_BHSL = F.softmax(scores_BHSL.float(), dim=-1).to(v_BHLd.dtype)
        probs_BHSL = F.dropout(probs_BHSL, self.dropout, self.training)
        return probs_BHSL @ v_BHLd

"""Attention "hf_gqa": GQA with the per-family switches of HF MoE checkpoints.

    Qwen2-MoE   q/k/v biases
    Qwen3-MoE   RMSNorm on each head of q and k before RoPE (head_dim may differ from D/H)
    OLMoE       RMSNorm on the full q and k projections (width H*d and G*d), optional
                clamp of q, k, v (clip_qkv)
    GPT-OSS     biases, sliding-window layers, attention sinks: a learned logit per head
                joins each softmax and takes mass without a value (Xiao et al. 2023,
                "Efficient Streaming Language Models with Attention Sinks")
    Llama 4     interleaved RoPE; NoPE layers (every 4th) with attention-temperature
                tuning (arXiv:2501.19399); weightless L2 q/k norm after RoPE; RoPE layers
                attend within chunks of attention_chunk tokens
Projection and norm names follow transformers (q_proj, ..., q_norm, k_norm, sinks), so
checkpoints map one to one. Masks other than plain causal use the eager path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers import Linear
from moekit.models.attention import ATTENTIONS, GroupedQueryAttention
from moekit.models.hf.rope import apply_rope_interleaved
from moekit.models.norm import RMSNorm
from moekit.models.rope import apply_rope


@ATTENTIONS.register("hf_gqa")
class HFGroupedQueryAttention(GroupedQueryAttention):
    def __init__(self, cfg, layer_idx: int) -> None:
        nn.Module.__init__(self)  # its own projections (biases, norms): not the base's fused one
        self.init_heads(cfg, layer_idx)
        D, H, G, d = cfg.d_model, self.n_heads, self.n_kv_heads, self.head_dim
        self.q_proj = Linear(D, H * d, bias=cfg.qkv_bias)
        self.k_proj = Linear(D, G * d, bias=cfg.qkv_bias)
        self.v_proj = Linear(D, G * d, bias=cfg.qkv_bias)
        self.o_proj = Linear(H * d, D, bias=cfg.o_bias)
        self.use_rope = cfg.rope_layers is None or bool(cfg.rope_layers[layer_idx])
        self.interleave, self.clip, self.eps = cfg.rope_interleave, cfg.clip_qkv, cfg.norm_eps
        self.qk_norm = cfg.qk_norm if (cfg.qk_norm != "l2" or self.use_rope) else "none"
        if self.qk_norm in ("head", "full"):
            q_w, k_w = (d, d) if self.qk_norm == "head" else (H * d, G * d)
            self.q_norm, self.k_norm = RMSNorm(q_w, cfg.norm_eps), RMSNorm(k_w, cfg.norm_eps)
        kind = cfg.layer_types[layer_idx] if cfg.layer_types is not None else "sliding_attention"
        self.window = cfg.sliding_window if kind == "sliding_attention" else None
        self.chunk = cfg.attention_chunk if kind == "chunked_attention" else None
        self.temperature = None if self.use_rope else cfg.temperature_tuning
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

    def _position(self, q_BHSd, k_BGSd, rope, start: int):
        if self.use_rope:
            rot = apply_rope_interleaved if self.interleave else apply_rope
            q_BHSd, k_BGSd = rot(q_BHSd, rope), rot(k_BGSd, rope)
        if self.qk_norm == "l2":  # Llama 4: unit-RMS q and k, no weight
            q_BHSd = F.rms_norm(q_BHSd.float(), (self.head_dim,), eps=self.eps).to(q_BHSd.dtype)
            k_BGSd = F.rms_norm(k_BGSd.float(), (self.head_dim,), eps=self.eps).to(k_BGSd.dtype)
        if self.temperature is not None:  # NoPE layers: q scaled up with log position
            floor, scale = self.temperature
            pos_S = torch.arange(start, start + q_BHSd.shape[2], device=q_BHSd.device).float()
            scale_S1 = (torch.log1p(torch.floor((pos_S + 1.0) / floor)) * scale + 1.0)[:, None]
            # the product in fp32, back in q's dtype (as transformers does): a bf16 or fp16 q
            # must not become fp32 beside a half-precision k
            q_BHSd = (q_BHSd * scale_S1).to(q_BHSd.dtype)
        return q_BHSd, k_BGSd

    def forward(self, x_BSD, rope, kv_cache=None):
        B, S, _ = x_BSD.shape
        q_BHSd, k_BGSd, v_BGSd = self._project(x_BSD)
        start = 0 if kv_cache is None else kv_cache.offset
        q_BHSd, k_BGSd = self._position(q_BHSd, k_BGSd, rope, start)
        if kv_cache is not None:
            k_BGSd, v_BGSd = kv_cache.update(self.layer_idx, k_BGSd, v_BGSd)
        y_BHSd = self._attend(q_BHSd, k_BGSd, v_BGSd)
        return self.o_proj(y_BHSd.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))

    def _attend(self, q_BHSd, k_BGLd, v_BGLd) -> torch.Tensor:
        if self.sinks is None and self.window is None and self.chunk is None:
            return super()._attend(q_BHSd, k_BGLd, v_BGLd)
        return self._attend_eager(q_BHSd, k_BGLd, v_BGLd)

    def _allowed(self, S: int, L: int, device) -> torch.Tensor:
        """Bool (S, L): causal, within the sliding window, inside the same chunk."""
        q_S1 = torch.arange(L - S, L, device=device)[:, None]
        k_1L = torch.arange(L, device=device)[None, :]
        allowed_SL = k_1L <= q_S1
        if self.window is not None:
            allowed_SL = allowed_SL & (q_S1 - k_1L < self.window)
        if self.chunk is not None:
            allowed_SL = allowed_SL & (q_S1 // self.chunk == k_1L // self.chunk)
        return allowed_SL

    def _attend_eager(self, q_BHSd, k_BGLd, v_BGLd) -> torch.Tensor:
        """Softmax attention written out: masks as above, the sink one more column."""
        S, L, rep = q_BHSd.shape[2], k_BGLd.shape[2], self.n_heads // self.n_kv_heads
        k_BHLd, v_BHLd = k_BGLd.repeat_interleave(rep, 1), v_BGLd.repeat_interleave(rep, 1)
        scores_BHSL = (q_BHSd @ k_BHLd.transpose(-1, -2)) * self.head_dim ** -0.5
        scores_BHSL = scores_BHSL.masked_fill(~self._allowed(S, L, q_BHSd.device), float("-inf"))
        if self.sinks is not None:
            B, H = scores_BHSL.shape[:2]
            sink_BHS1 = self.sinks.view(1, H, 1, 1).expand(B, H, S, 1).to(scores_BHSL.dtype)
            probs = F.softmax(torch.cat([scores_BHSL, sink_BHS1], dim=-1).float(), dim=-1)
            probs_BHSL = probs[..., :-1].to(v_BHLd.dtype)  # the sink's share is dropped
        else:
            probs_BHSL = F.softmax(scores_BHSL.float(), dim=-1).to(v_BHLd.dtype)
        probs_BHSL = F.dropout(probs_BHSL, self.dropout, self.training)
        return probs_BHSL @ v_BHLd

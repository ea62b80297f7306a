"""Attention "mla": multi-head latent attention (DeepSeek-V2, arXiv:2405.04434 §2.1).

    q  = W_qb · RMSNorm(W_qa · x)          (or W_q · x without q compression)
    c  = RMSNorm(W_kv_a · x)[:kv_lora]     the compressed latent, shared by all heads
    kr = RoPE(W_kv_a · x)[kv_lora:]        one rotary key shared by all heads (§2.1.3)
    [k_nope | v] = W_kv_b · c   per head;  k = [k_nope | kr],  q = [q_nope | RoPE(q_rope)]
The KV cache holds only (c, kr): kv_lora + rope_dim numbers per token instead of
2·H·d (eq. 10 vs eq. 5). Heads are expanded from the cache each step (the naive,
non-absorbed form; it reads the same numbers as transformers' implementation).
Module names follow transformers' DeepseekV3Attention so checkpoints map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers import Linear
from moekit.models.attention import ATTENTIONS, causal_mask
from moekit.models.kv_cache import KVCache
from moekit.models.norm import RMSNorm
from moekit.models.rope import RopeTables, apply_rope


class LatentKVCache(KVCache):
    """KVCache whose "k" is the latent c (B, 1, L, kv_lora) and "v" the rotary key kr
    (B, 1, L, rope_dim)."""

    def __init__(self, n_layers: int, batch: int, max_len: int, kv_lora: int, rope_dim: int, *,
                 dtype=torch.float32, device="cpu") -> None:
        super().__init__(n_layers, batch, 1, max_len, kv_lora, dtype=dtype, device=device)
        self.v = [torch.zeros(batch, 1, max_len, rope_dim, dtype=dtype, device=device)
                  for _ in range(n_layers)]


def mla_softmax_scale(cfg) -> float:
    """1/sqrt(d_qk), times mscale² under YaRN with mscale_all_dim (DeepSeek-V2 App. B:
    the attention logits are rescaled together with the rotary tables)."""
    from moekit.models.hf.rope import yarn_mscale

    scale = (cfg.qk_nope_head_dim + cfg.head_size) ** -0.5
    if cfg.rope.get("rope_type", "default") == "yarn" and cfg.rope.get("mscale_all_dim"):
        scale *= yarn_mscale(cfg.rope["factor"], cfg.rope["mscale_all_dim"]) ** 2
    return scale


@ATTENTIONS.register("mla")
class MultiHeadLatentAttention(nn.Module):
    def __init__(self, cfg, layer_idx: int) -> None:
        super().__init__()
        D, H = cfg.d_model, cfg.n_heads
        self.layer_idx, self.n_heads, self.dropout = layer_idx, H, cfg.dropout
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.head_size, cfg.v_head_dim
        self.kv_lora, self.interleave = cfg.kv_lora_rank, cfg.rope_interleave
        bias = cfg.o_bias  # DeepSeek's attention_bias: q_a, kv_a and o projections
        qk = self.nope + self.rope_dim
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(D, H * qk, bias=False)
        else:
            self.q_a_proj = Linear(D, cfg.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = Linear(D, self.kv_lora + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora, 1e-6)
        self.kv_b_proj = Linear(self.kv_lora, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = Linear(H * self.v_dim, D, bias=bias)
        self.scale = mla_softmax_scale(cfg)

    def _rope(self, x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
        from moekit.models.hf.rope import apply_rope_interleaved

        return apply_rope_interleaved(x, rope) if self.interleave else apply_rope(x, rope)

    def forward(self, x_BSD: torch.Tensor, rope: RopeTables, kv_cache=None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q = self.q_proj(x_BSD) if hasattr(self, "q_proj") else \
            self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        q_BHSq = q.view(B, S, self.n_heads, -1).transpose(1, 2)
        q_nope, q_rot = q_BHSq.split([self.nope, self.rope_dim], dim=-1)
        c_BSC, kr_BSr = self.kv_a_proj_with_mqa(x_BSD).split([self.kv_lora, self.rope_dim], dim=-1)
        c_B1SC = self.kv_a_layernorm(c_BSC)[:, None]
        kr_B1Sr = self._rope(kr_BSr[:, None], rope)
        q_BHSq = torch.cat([q_nope, self._rope(q_rot, rope)], dim=-1)
        if kv_cache is not None:
            c_B1SC, kr_B1Sr = kv_cache.update(self.layer_idx, c_B1SC, kr_B1Sr)  # now L tokens
        k_BHLq, v_BHLv = self._expand(c_B1SC, kr_B1Sr)
        L = k_BHLq.shape[2]
        mask = None if S == L else causal_mask(S, L, x_BSD.device)
        y_BHSv = F.scaled_dot_product_attention(
            q_BHSq, k_BHLq, v_BHLv, attn_mask=mask, is_causal=(S == L and S > 1),
            dropout_p=self.dropout if self.training else 0.0, scale=self.scale)
        return self.o_proj(y_BHSv.transpose(1, 2).reshape(B, S, self.n_heads * self.v_dim))

    def _expand(self, c_B1LC: torch.Tensor, kr_B1Lr: torch.Tensor):
        B, _, L, _ = c_B1LC.shape
        kv = self.kv_b_proj(c_B1LC[:, 0]).view(B, L, self.n_heads, self.nope + self.v_dim)
        k_nope, v_BLHv = kv.split([self.nope, self.v_dim], dim=-1)
        k_BHLq = torch.cat([k_nope.transpose(1, 2), kr_B1Lr.expand(B, self.n_heads, L, -1)], dim=-1)
        return k_BHLq, v_BLHv.transpose(1, 2)

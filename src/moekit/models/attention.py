"""Attention kinds, chosen by name (LMConfig.attention). A kind is built as cls(cfg, layer_idx)
and called as attn(x_BSD, rope, kv_cache) -> y_BSD; it owns its projections and writes
its own entries of the KVCache. New kinds (MLA, sliding window, sinks) are one class
and one line here.

Shapes: B batch, S new tokens, L keys attended (cache offset + S), D model width,
H query heads, G key/value heads, d head_dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers import Linear, linear
from moekit.models.kv_cache import KVCache
from moekit.models.rope import RopeTables, apply_rope
from moekit.ops import attention as fused_attention
from moekit.registry import Registry

ATTENTIONS: Registry[type[nn.Module]] = Registry("attention")


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor | None:
    """Bool (S, L) mask, True = may attend, for S new queries after L - S cached keys.

    None when SDPA's own flags suffice: S == 1 sees every key. (SDPA's is_causal aligns
    the triangle top-left, which is wrong once keys outnumber queries, so that case
    needs this explicit bottom-right mask.)
    """
    if q_len == 1:
        return None
    offset = k_len - q_len
    i_S1 = torch.arange(q_len, device=device)[:, None]
    j_1L = torch.arange(k_len, device=device)[None, :]
    return j_1L <= i_S1 + offset


@ATTENTIONS.register("gqa")
class GroupedQueryAttention(nn.Module):
    """Multi-head attention (Vaswani et al. 2017) with G <= H key/value heads shared by
    groups of H/G query heads (GQA, Ainslie et al. 2023; G = 1 is multi-query attention).
    Projection names follow HF (q_proj, k_proj, v_proj, o_proj)."""

    def __init__(self, cfg, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_size
        self.dropout = cfg.dropout
        D, H, G, d = cfg.d_model, self.n_heads, self.n_kv_heads, self.head_dim
        self.q_proj = Linear(D, H * d, bias=False)
        self.k_proj = Linear(D, G * d, bias=False)
        self.v_proj = Linear(D, G * d, bias=False)
        self.o_proj = Linear(H * d, D, bias=False)

    def forward(self, x_BSD: torch.Tensor, rope: RopeTables, kv_cache: KVCache | None = None
                ) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        if kv_cache is None and self._plain_projections() and fused_attention.applies_to_projection(
                x_BSD, self.q_proj.weight, self.head_dim, self._dropout_p()):
            # training and cache-free forwards on CPU: one product for q, k and v, then RoPE
            # + causal attention in one kernel, which hands back one gradient for all three
            w_XD = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
            y_BSY = fused_attention.attend_qkv(linear(x_BSD, w_XD), self.n_heads, self.n_kv_heads,
                                               rope.cos_SH, rope.sin_SH)
            return self.o_proj(y_BSY)
        q_BHSd = self.q_proj(x_BSD).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k_BGSd = self.k_proj(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v_BGSd = self.v_proj(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q_BHSd, k_BGSd = apply_rope(q_BHSd, rope), apply_rope(k_BGSd, rope)
        if kv_cache is not None:
            k_BGSd, v_BGSd = kv_cache.update(self.layer_idx, k_BGSd, v_BGSd)  # now L keys
        y_BHSd = self._attend(q_BHSd, k_BGSd, v_BGSd)
        return self.o_proj(y_BHSd.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))

    def _plain_projections(self) -> bool:
        """q, k, v are this module's own bias-free Linears with no hooks: stacking their
        weights computes exactly what calling them would. A projection replaced or wrapped
        (a LoRA adapter, say) or hooked keeps the three calls."""
        return all(type(p) is Linear and p.bias is None and not p._forward_hooks and not p._forward_pre_hooks
                   for p in (self.q_proj, self.k_proj, self.v_proj))

    def _dropout_p(self) -> float:
        return self.dropout if self.training else 0.0

    def _attend(self, q_BHSd, k_BGLd, v_BGLd) -> torch.Tensor:
        S, L = q_BHSd.shape[2], k_BGLd.shape[2]
        mask = None if S == L else causal_mask(S, L, q_BHSd.device)
        return F.scaled_dot_product_attention(
            q_BHSd, k_BGLd, v_BGLd, attn_mask=mask, is_causal=(S == L and S > 1),
            dropout_p=self._dropout_p(),
            enable_gqa=self.n_kv_heads != self.n_heads)


def build_attention(cfg, layer_idx: int) -> nn.Module:
    return ATTENTIONS.get(cfg.attention)(cfg, layer_idx)

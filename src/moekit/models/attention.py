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

from moekit.layers import Linear
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


QKV_KEYS = ("q_proj.weight", "k_proj.weight", "v_proj.weight")


@ATTENTIONS.register("gqa")
class GroupedQueryAttention(nn.Module):
    """Multi-head attention (Vaswani et al. 2017) with G <= H key/value heads shared by
    groups of H/G query heads (GQA, Ainslie et al. 2023; G = 1 is multi-query attention).

    q, k and v come from one projection, qkv_proj ((H + 2G)·d, D): one product per
    forward (and one dx and one dw product backward) instead of three. Its state dict
    keeps HF's names, q_proj.weight, k_proj.weight, v_proj.weight (split on save,
    joined on load), so checkpoints read and write as before.

    Whether the fused RoPE + causal attention kernel (ops/attention.py) serves this
    module is decided when it is built (`self.kernel`); per call only the input's shape,
    dtype and the dropout in force are checked. It serves cache-free forwards (training,
    scoring); decode and cached prefill take RoPE + SDPA, also the kernel's reference."""

    def __init__(self, cfg, layer_idx: int) -> None:
        super().__init__()
        self.init_heads(cfg, layer_idx)
        D, H, G, d = cfg.d_model, self.n_heads, self.n_kv_heads, self.head_dim
        self.qkv_proj = Linear(D, (H + 2 * G) * d, bias=False)
        self.o_proj = Linear(H * d, D, bias=False)
        self.kernel = fused_attention.kernel_fits(d)
        self._register_state_dict_hook(_split_qkv)
        self._register_load_state_dict_pre_hook(_join_qkv, with_module=True)

    def init_heads(self, cfg, layer_idx: int) -> None:
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_size
        self.dropout = cfg.dropout

    @property
    def qkv_widths(self) -> tuple[int, int, int]:
        d = self.head_dim
        return self.n_heads * d, self.n_kv_heads * d, self.n_kv_heads * d

    def forward(self, x_BSD: torch.Tensor, rope: RopeTables, kv_cache: KVCache | None = None
                ) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        qkv_BSX = self.qkv_proj(x_BSD)
        if kv_cache is None and self.kernel and fused_attention.takes(x_BSD, S, self._dropout_p()):
            # RoPE + causal attention in one kernel, which hands back one gradient for q, k, v
            y_BSY = fused_attention.attend_qkv(qkv_BSX, self.n_heads, self.n_kv_heads, rope.cos_SH, rope.sin_SH)
            return self.o_proj(y_BSY)
        q_BHSd, k_BGSd, v_BGSd = fused_attention.split_qkv(qkv_BSX, self.n_heads, self.n_kv_heads)
        q_BHSd, k_BGSd = apply_rope(q_BHSd, rope), apply_rope(k_BGSd, rope)
        if kv_cache is not None:
            k_BGSd, v_BGSd = kv_cache.update(self.layer_idx, k_BGSd, v_BGSd)  # now L keys
        y_BHSd = self._attend(q_BHSd, k_BGSd, v_BGSd)
        return self.o_proj(y_BHSd.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))

    def _dropout_p(self) -> float:
        return self.dropout if self.training else 0.0

    def _attend(self, q_BHSd, k_BGLd, v_BGLd) -> torch.Tensor:
        S, L = q_BHSd.shape[2], k_BGLd.shape[2]
        mask = None if S == L else causal_mask(S, L, q_BHSd.device)
        return F.scaled_dot_product_attention(
            q_BHSd, k_BGLd, v_BGLd, attn_mask=mask, is_causal=(S == L and S > 1),
            dropout_p=self._dropout_p(),
            enable_gqa=self.n_kv_heads != self.n_heads)


def _split_qkv(module, state_dict, prefix, local_metadata) -> None:
    """state_dict hook: qkv_proj.weight -> q_proj.weight, k_proj.weight, v_proj.weight."""
    w = state_dict.pop(prefix + "qkv_proj.weight", None)
    if w is None:
        return
    for key, part in zip(QKV_KEYS, w.split(module.qkv_widths), strict=True):
        state_dict[prefix + key] = part if isinstance(part, nn.Parameter) else part.clone()


def _join_qkv(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: q/k/v_proj.weight -> qkv_proj.weight."""
    if all(prefix + k in state_dict for k in QKV_KEYS):
        state_dict[prefix + "qkv_proj.weight"] = torch.cat([state_dict.pop(prefix + k) for k in QKV_KEYS])


def build_attention(cfg, layer_idx: int) -> nn.Module:
    return ATTENTIONS.get(cfg.attention)(cfg, layer_idx)

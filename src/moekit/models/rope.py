"""Rotary position embedding (Su et al. 2021, "RoFormer", eq. 34).

The "rotate half" layout of GPT-NeoX / LLaMA / HF transformers: channel i pairs with
channel i + head_dim/2 (not with i+1), so HF checkpoints load without permuting q/k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moekit.ops.rope import rotate


@dataclass(frozen=True)
class RopeTables:
    """cos/sin for the positions of one forward, shape (S, head_dim), fp32."""

    cos_SH: torch.Tensor
    sin_SH: torch.Tensor


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        inv_freq_h = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angle_Sh = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * inv_freq_h[None, :]
        angle_SH = torch.cat([angle_Sh, angle_Sh], dim=-1)
        # not persistent: recomputed from the config, never part of a checkpoint
        self.register_buffer("cos_SH", angle_SH.cos().float(), persistent=False)
        self.register_buffer("sin_SH", angle_SH.sin().float(), persistent=False)

    def forward(self, start: int, length: int) -> RopeTables:
        """Tables for positions start, ..., start + length - 1."""
        return RopeTables(self.cos_SH[start : start + length], self.sin_SH[start : start + length])


def apply_rope(x_BHSd: torch.Tensor, rope: RopeTables) -> torch.Tensor:
    """x · cos + rotate_half(x) · sin, computed in x's dtype (ops/rope.py)."""
    return rotate(x_BHSd, rope.cos_SH, rope.sin_SH)

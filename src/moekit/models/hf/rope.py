"""RoPE tables of HF checkpoints: default, YaRN (Peng et al. 2023, arXiv:2309.00071), llama3.

YaRN blends interpolated (1/(factor·θ^(2i/d))) and original frequencies with a linear
ramp between the dims that rotate beta_fast and beta_slow times over the original
context (§3.2 "NTK-by-parts"), and scales cos/sin by the attention factor
0.1·ln(factor)+1 (§3.4; DeepSeek's mscale / mscale_all_dim ratio when both are given).
Computed in fp32 the way transformers does, so the tables agree bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moekit.models.rope import RopeTables


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _ramp(low: float, high: float, n: int) -> torch.Tensor:
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    return ((torch.arange(n, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)


def yarn_inv_freq(dim: int, theta: float, p: dict) -> tuple[torch.Tensor, float]:
    factor, orig = p["factor"], p["original_max_position_embeddings"]
    ms, ms_all = p.get("mscale"), p.get("mscale_all_dim")
    attn = p.get("attention_factor")
    if attn is None:
        attn = yarn_mscale(factor, ms) / yarn_mscale(factor, ms_all) if ms and ms_all else yarn_mscale(factor)

    def corr_dim(rot: float) -> float:
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = corr_dim(p.get("beta_fast") or 32), corr_dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolate = 1 - _ramp(low, high, dim // 2)
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv, float(attn)


def llama3_inv_freq(inv_h: torch.Tensor, p: dict) -> torch.Tensor:
    """Llama 3.1 "llama3" scaling: long wavelengths divided by `factor`, short ones kept,
    a smooth blend in between (as transformers' _compute_llama3_parameters)."""
    factor, lo, hi = p["factor"], p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
    old = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_h
    scaled = torch.where(wavelen > old / lo, inv_h / factor, inv_h)
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    return torch.where(medium, blended, scaled)


class HFRotary(nn.Module):
    """cos/sin (S, dim) in the "cat(freqs, freqs)" layout, times the attention factor."""

    def __init__(self, dim: int, max_seq_len: int, theta: float, params: dict) -> None:
        super().__init__()
        if params.get("rope_type", "default") == "yarn":
            inv_h, attn = yarn_inv_freq(dim, theta, params)
        else:
            inv_h = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
            attn = 1.0
            if params.get("rope_type") == "llama3":
                inv_h = llama3_inv_freq(inv_h, params)
        angle_Sh = torch.arange(max_seq_len, dtype=torch.float32)[:, None] * inv_h[None, :]
        angle_SH = torch.cat([angle_Sh, angle_Sh], dim=-1)
        self.register_buffer("cos_SH", angle_SH.cos() * attn, persistent=False)
        self.register_buffer("sin_SH", angle_SH.sin() * attn, persistent=False)

    def forward(self, start: int, length: int) -> RopeTables:
        return RopeTables(self.cos_SH[start : start + length], self.sin_SH[start : start + length])


def apply_rope_interleaved(x_BHSd: torch.Tensor, rope: RopeTables) -> torch.Tensor:
    """DeepSeek's layout: pairs (x0, x1), (x2, x3), ... share a frequency; the output is
    de-interleaved ([evens | odds] rotated), as transformers' rope_interleave does."""
    h = rope.cos_SH.shape[-1] // 2
    cos, sin = rope.cos_SH[:, :h].to(x_BHSd.dtype), rope.sin_SH[:, :h].to(x_BHSd.dtype)
    x1, x2 = x_BHSd[..., 0::2], x_BHSd[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

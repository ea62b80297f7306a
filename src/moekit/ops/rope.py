"""The rotary embedding's rotation on tensors (Su et al. 2021, "RoFormer", eq. 34), in the
"rotate half" layout of GPT-NeoX / LLaMA / HF transformers: channel i pairs with channel
i + head_dim/2. models/rope.py builds the tables; ops/attention.py's reference and the
models' attention both rotate through here."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat([-x[..., h:], x[..., :h]], dim=-1)


def rotate(x: torch.Tensor, cos_SD: torch.Tensor, sin_SD: torch.Tensor) -> torch.Tensor:
    """x · cos + rotate_half(x) · sin, computed in x's dtype (fp32 tables cast once)."""
    return x * cos_SD.to(x.dtype) + rotate_half(x) * sin_SD.to(x.dtype)

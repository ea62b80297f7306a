"""Norms, chosen by name (LMConfig.norm). A norm is built as cls(dim, eps)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.ops import rmsnorm
from moekit.registry import Registry

NORMS: Registry[type[nn.Module]] = Registry("norm")


@NORMS.register("rmsnorm")
class RMSNorm(nn.Module):
    """y = x / rms(x) · w (Zhang & Sennrich 2019), as in LLaMA, Mixtral, DeepSeek, Qwen."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm.rms_norm(x, self.weight, self.eps)  # a CPU kernel, or F.rms_norm


@NORMS.register("layernorm")
class LayerNorm(nn.Module):
    """LayerNorm without bias (nanoGPT's option; OLMo)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, None, self.eps)


def build_norm(name: str, dim: int, eps: float) -> nn.Module:
    return NORMS.get(name)(dim, eps)

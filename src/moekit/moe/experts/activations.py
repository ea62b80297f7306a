"""Expert kinds: an activation on the input projection h_RN (N = 2F for gated kinds),
with a hand-written backward used by the fused path. The forward is plain torch, so
the loop oracle differentiates it with autograd and the tests compare the two."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moekit.registry import Registry


@dataclass(frozen=True)
class Activation:
    name: str
    gated: bool  # input projection is [gate | up], N = 2F (Shazeer 2020, "GLU variants")
    fwd: Callable[[torch.Tensor], torch.Tensor]  # h_RN -> a_RF
    bwd: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (h_RN, da_RF) -> dh_RN

    def width_in(self, d_ff: int) -> int:
        return 2 * d_ff if self.gated else d_ff


ACTIVATIONS: Registry[Activation] = Registry("expert")


def _gelu_grad(g: torch.Tensor) -> torch.Tensor:
    cdf = 0.5 * (1.0 + torch.erf(g * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * g * g) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + g * pdf


def _split(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = h.shape[-1] // 2
    return h[..., :f], h[..., f:]


def _swiglu_fwd(h):
    g, u = _split(h)
    return F.silu(g) * u


def _swiglu_bwd(h, da):
    g, u = _split(h)
    s = torch.sigmoid(g)
    silu = g * s
    dg = da * u * (s * (1.0 + g * (1.0 - s)))
    return torch.cat([dg, da * silu], dim=-1)


def _geglu_fwd(h):
    g, u = _split(h)
    return F.gelu(g) * u


def _geglu_bwd(h, da):
    g, u = _split(h)
    return torch.cat([da * u * _gelu_grad(g), da * F.gelu(g)], dim=-1)


ACTIVATIONS.register("swiglu")(Activation("swiglu", True, _swiglu_fwd, _swiglu_bwd))
ACTIVATIONS.register("geglu")(Activation("geglu", True, _geglu_fwd, _geglu_bwd))
ACTIVATIONS.register("gelu")(Activation("gelu", False, F.gelu, lambda h, da: da * _gelu_grad(h)))
ACTIVATIONS.register("relu")(Activation("relu", False, F.relu, lambda h, da: da * (h > 0).to(da.dtype)))

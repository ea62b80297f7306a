"""The router contract: x_TD -> Routing. Router math runs in fp32 whatever the input dtype
(Switch Transformer §2.4 "selective precision": bf16 routers are unstable)."""

from __future__ import annotations

import torch
from torch import nn

from moekit.layers import linear
from moekit.moe.config import MoEConfig
from moekit.moe.types import Routing
from moekit.ops import topk
from moekit.registry import Registry

ROUTERS: Registry[type[Router]] = Registry("router")


class Router(nn.Module):
    """Base: a linear projection to E logits (fp32), `route` turns them into a Routing."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(cfg.num_experts)) if cfg.router_bias else None
        self.reset_parameters()

    @classmethod
    def check_config(cls, cfg: MoEConfig) -> None:
        """Variant-specific validation, called when the config is built. A variant that
        reads router_options overrides this; the rest reject options (a typo is not ignored)."""
        if cfg.router_options:
            raise ValueError(f"MoEConfig.router_options={cfg.router_options!r} is invalid: "
                             f"router {cfg.router!r} takes no options")

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.cfg.init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        dt = router_dtype(x_TD)
        w = self.weight.to(dt)
        b = None if self.bias is None else self.bias.to(dt)
        with torch.autocast(x_TD.device.type, enabled=False):  # fp32 under bf16 autocast too
            return linear(x_TD.to(dt), w, b)

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routing:
        raise NotImplementedError


def router_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs; fp64 stays fp64 (exact parity tests and gradcheck)."""
    return torch.promote_types(x.dtype, torch.float32)


def reject_unknown_options(cfg: MoEConfig, allowed: tuple[str, ...]) -> None:
    """For routers that read router_options: a misspelt option is an error, not ignored."""
    unknown = sorted(set(cfg.router_options) - set(allowed))
    if unknown:
        raise ValueError(f"MoEConfig.router_options={cfg.router_options!r} is invalid: router "
                         f"{cfg.router!r} takes {', '.join(map(repr, allowed))}; unknown {unknown}")


def topk_ids(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, largest first (ops/topk.py: on CPU float32, from
    128 rows, a kernel 4-8x quicker than torch.topk that gives ties to the lower id)."""
    return topk.topk_ids(scores_TE, k)

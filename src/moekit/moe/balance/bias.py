"""Aux-loss-free balancing (DeepSeek-V3 §2.1.2, Wang et al. 2024): after each optimizer
step, b_i += γ · sign(mean load − load_i). The bias enters expert selection only."""

from __future__ import annotations

import torch


@torch.no_grad()
def update_expert_bias(expert_bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> torch.Tensor:
    """Move the bias in place toward uniform load; load_E is the slot count per expert
    accumulated over the step's micro-batches. Returns the applied delta."""
    load_E = load_E.float()
    delta_E = rate * torch.sign(load_E.mean() - load_E)
    expert_bias_E.add_(delta_E)
    return delta_E


def bias_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every router of model in module order (one per MoE layer), bias-balanced or not,
    so that they line up with the model's per-layer stats."""
    from moekit.moe.router.base import Router  # the router package imports nothing from balance

    return [m for m in model.modules() if isinstance(m, Router)]


@torch.no_grad()
def update_router_biases(model: torch.nn.Module, loads: list[torch.Tensor], rate: float | None = None) -> int:
    """Apply eq. 16 once to each router with an `expert_bias` buffer. loads[i] is the
    slot count per expert of the i-th router of the model (bias_routers order), summed
    over the step's micro-batches; rate defaults to each router's cfg.bias_update_rate.
    Returns how many biases moved."""
    routers = bias_routers(model)
    if len(loads) != len(routers):
        raise ValueError(f"update_router_biases: got {len(loads)} loads for {len(routers)} MoE routers")
    moved = 0
    for router, load_E in zip(routers, loads, strict=True):
        bias_E = getattr(router, "expert_bias", None)
        if bias_E is None:
            continue
        update_expert_bias(bias_E, load_E.to(bias_E.device), router.cfg.bias_update_rate if rate is None else rate)
        moved += 1
    return moved


class LoadAccumulator:
    """Sums per-layer expert loads over the micro-batches of one optimizer step, then
    moves the biases once (DeepSeek-V3 updates b after each training step, not per
    micro-batch):

        acc = LoadAccumulator()
        for micro in batches:  out = model(micro); acc.add(out.stats) ...
        optimizer.step(); acc.step(model)

    add() takes one RoutingStats (a single MoELayer) or a list of them (one per layer,
    in module order; None entries, dense layers, are skipped). The loads are `requested_per_expert`: the router's choices before
    capacity drops, which is what the bias steers.
    """

    def __init__(self, rate: float | None = None) -> None:
        self.rate = rate
        self.loads: list[torch.Tensor] | None = None

    @torch.no_grad()
    def add(self, stats) -> None:
        per_layer = stats if isinstance(stats, (list, tuple)) else [stats]
        per_layer = [s for s in per_layer if s is not None]  # LMOutput.stats: None for dense layers
        counts = [s.requested_per_expert.detach().float() for s in per_layer]
        if self.loads is None:
            self.loads = [c.clone() for c in counts]
            return
        if len(counts) != len(self.loads):
            raise ValueError(f"LoadAccumulator.add: {len(counts)} layers, earlier micro-batches had {len(self.loads)}")
        for acc, c in zip(self.loads, counts, strict=True):
            acc.add_(c)

    def step(self, model: torch.nn.Module) -> int:
        """Apply the accumulated loads to the model's biases and reset; returns biases moved."""
        if self.loads is None:
            return 0
        moved = update_router_biases(model, self.loads, self.rate)
        self.loads = None
        return moved

"""Routing metrics computed on every forward, detached, with no host sync."""

from __future__ import annotations

import torch

from moekit.moe.types import DispatchPlan, Routing, RoutingStats


def routing_stats(routing: Routing, plan: DispatchPlan) -> RoutingStats:
    """The metrics of one forward, each computed when first read (see RoutingStats)."""
    counts_E, requested_E, p_TE = plan.counts_E.detach(), plan.requested_E.detach(), routing.probs_TE.detach()
    return RoutingStats({
        "tokens_per_expert": lambda: counts_E,
        "requested_per_expert": lambda: requested_E,
        "drop_fraction": lambda: _drop_fraction(counts_E, requested_E),
        "router_entropy": lambda: _entropy(p_TE),
        "dead_experts": lambda: (counts_E == 0).sum(),
        "unrouted_fraction": lambda: _unrouted(plan.token_idx_R, plan.num_tokens, p_TE),
    })


def _drop_fraction(counts_E: torch.Tensor, requested_E: torch.Tensor) -> torch.Tensor:
    assigned, kept = requested_E.sum().float(), counts_E.sum().float()
    return torch.where(assigned > 0, 1.0 - kept / assigned.clamp(min=1.0), torch.zeros_like(assigned))


def _entropy(p_TE: torch.Tensor) -> torch.Tensor:
    if not p_TE.shape[0]:
        return p_TE.new_zeros(())
    return -(p_TE * torch.log(p_TE.clamp(min=1e-20))).sum(-1).mean()


def _unrouted(token_idx_R: torch.Tensor, num_tokens: int, p_TE: torch.Tensor) -> torch.Tensor:
    if not p_TE.shape[0]:
        return p_TE.new_zeros(())
    per_token = torch.bincount(token_idx_R, minlength=num_tokens)
    return (per_token == 0).float().mean()

"""Routing metrics computed on every forward, detached, with no host sync."""

from __future__ import annotations

import torch

from moekit.moe.types import DispatchPlan, Routing, RoutingStats


@torch.no_grad()
def routing_stats(routing: Routing, plan: DispatchPlan) -> RoutingStats:
    counts_E = plan.counts_E
    requested_E = plan.requested_E
    assigned = requested_E.sum().float()
    kept = counts_E.sum().float()
    drop = torch.where(assigned > 0, 1.0 - kept / assigned.clamp(min=1.0), torch.zeros_like(assigned))
    p_TE = routing.probs_TE.detach()
    if p_TE.shape[0]:
        entropy = -(p_TE * torch.log(p_TE.clamp(min=1e-20))).sum(-1).mean()
        per_token = torch.bincount(plan.token_idx_R, minlength=plan.num_tokens)
        unrouted = (per_token == 0).float().mean()
    else:
        entropy = p_TE.new_zeros(())
        unrouted = p_TE.new_zeros(())
    return RoutingStats(
        tokens_per_expert=counts_E.detach(),
        requested_per_expert=requested_E.detach(),
        drop_fraction=drop,
        router_entropy=entropy,
        dead_experts=(counts_E == 0).sum(),
        unrouted_fraction=unrouted,
    )

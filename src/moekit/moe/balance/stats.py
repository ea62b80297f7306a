"""Routing metrics: built on every forward, detached, no host sync; computed when read."""

from __future__ import annotations

from moekit.moe.types import DispatchPlan, Routing, RoutingStats


def routing_stats(routing: Routing, plan: DispatchPlan) -> RoutingStats:
    """The metrics of one forward, each computed when first read (see RoutingStats)."""
    return RoutingStats(plan.counts_E, plan.requested_E, routing.probs_TE, plan.token_idx_R, plan.num_tokens)

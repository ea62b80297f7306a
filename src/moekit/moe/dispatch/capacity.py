"""Capacity dispatch (GShard §2.2, Switch §2.2): each expert takes at most
C = ceil(capacity_factor · T · K / E) rows; the rest are dropped and contribute nothing
from that expert (the residual connection around the layer carries those tokens).

drop_policy "position": first choices before second choices, each in token order
(GShard's priority). "probability": highest router weight first (Batch Prioritized
Routing, Riquelme et al. 2021 §3.1).
"""

from __future__ import annotations

import math

import torch

from moekit.moe.dispatch.base import DISPATCHERS, make_plan
from moekit.ops.sort import sort_slots_by_expert


def capacity_of(num_tokens: int, cfg) -> int:
    return math.ceil(cfg.capacity_factor * num_tokens * cfg.top_k / cfg.num_experts)


@DISPATCHERS.register("capacity")
def capacity(routing, cfg):
    T, K = routing.expert_ids_TK.shape
    E = routing.num_experts
    C = capacity_of(T, cfg)
    slot_idx_S, requested_E = sort_slots_by_expert(routing.expert_ids_TK, E)
    if cfg.drop_policy == "probability":
        slot_idx_S = _reorder_by_weight(routing, slot_idx_S, requested_E)
    starts_E = torch.cumsum(requested_E, 0) - requested_E
    expert_S = torch.repeat_interleave(torch.arange(E, device=requested_E.device), requested_E)
    rank_S = torch.arange(slot_idx_S.shape[0], device=slot_idx_S.device) - starts_E[expert_S]
    keep_S = rank_S < C
    return make_plan(routing, slot_idx_S[keep_S], requested_E.clamp(max=C), requested_E, C)


def _reorder_by_weight(routing, slot_idx_S, counts_E):
    """Within each expert's block, order slots by descending router weight (stable)."""
    E = counts_E.shape[0]
    expert_S = torch.repeat_interleave(torch.arange(E, device=counts_E.device), counts_E)
    w_S = routing.weights_TK.detach().reshape(-1)[slot_idx_S].float()
    # sort by weight descending, then stably by expert: expert blocks stay, weight order inside
    by_w = torch.sort(-w_S, stable=True).indices
    by_e = torch.sort(expert_S[by_w], stable=True).indices
    return slot_idx_S[by_w[by_e]]

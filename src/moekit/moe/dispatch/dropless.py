"""Dropless dispatch (MegaBlocks, Gale et al. 2022): every assigned slot is computed."""

from __future__ import annotations

from moekit.moe.dispatch.base import DISPATCHERS, make_plan
from moekit.ops.sort import sort_slots_by_expert


@DISPATCHERS.register("dropless")
def dropless(routing, cfg):
    slot_idx_R, counts_E = sort_slots_by_expert(routing.expert_ids_TK, routing.num_experts)
    return make_plan(routing, slot_idx_R, counts_E, counts_E)

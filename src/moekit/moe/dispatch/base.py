"""Dispatch: Routing -> DispatchPlan (rows grouped by expert). Same contract for all variants."""

from __future__ import annotations

from collections.abc import Callable

import torch

from moekit.moe.config import MoEConfig
from moekit.moe.types import DispatchPlan, Routing
from moekit.registry import Registry

Dispatcher = Callable[[Routing, MoEConfig], DispatchPlan]
DISPATCHERS: Registry[Dispatcher] = Registry("dispatch")


def make_plan(routing: Routing, slot_idx_R: torch.Tensor, counts_E: torch.Tensor,
              requested_E: torch.Tensor, capacity: int | None = None) -> DispatchPlan:
    T, K = routing.expert_ids_TK.shape
    weights_R = routing.weights_TK.reshape(-1).index_select(0, slot_idx_R)
    # slot t·K + k -> token t. Slots are >= 0, so for K a power of two a shift does it:
    # 6 us against torch.div's 63 us for 32768 slots (2 threads)
    token_idx_R = slot_idx_R >> (K.bit_length() - 1) if K > 0 and K & (K - 1) == 0 else \
        torch.div(slot_idx_R, K, rounding_mode="floor")
    return DispatchPlan(
        token_idx_R=token_idx_R,
        slot_idx_R=slot_idx_R,
        weights_R=weights_R,
        counts_E=counts_E,
        requested_E=requested_E,
        num_tokens=T,
        capacity=capacity,
        top_k=K,
    )

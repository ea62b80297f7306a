"""Group routed slots by expert: the permutation behind every dispatch."""

from __future__ import annotations

import torch

from moekit.ops import ext


def sort_slots_by_expert(expert_ids_TK: torch.Tensor, num_experts: int, host_max_slots: int | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable order of the flat slots t*K+k grouped by expert, and the experts' slot counts.

    Slots with expert id -1 (empty) sort last and are not counted. Within an expert the
    order is k-major (all first choices, then all second choices, ...), each in token
    order, so capacity "by position" keeps first choices first (GShard §2.2, Switch §2.2).

    Returns slot_idx_S (flat t*K+k indices of the assigned slots, grouped by expert) and
    counts_E. A histogram (bincount), not a scan per expert, keeps it one pass.
    host_max_slots: up to this many slots the order is built in Python (default
    HOST_MAX_SLOTS; tests pass -1 or a huge number to reach both paths).
    """
    T, K = expert_ids_TK.shape
    limit = HOST_MAX_SLOTS if host_max_slots is None else host_max_slots
    if expert_ids_TK.device.type == "cpu" and T * K <= limit:
        return _sort_on_host(expert_ids_TK, num_experts)
    if expert_ids_TK.device.type == "cpu" and expert_ids_TK.dtype == torch.int64 and ext.available():
        return _sort_by_counting(expert_ids_TK, num_experts)
    return _sort_with_tensors(expert_ids_TK, num_experts)


def _sort_with_tensors(expert_ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference, and the path on other devices: a stable sort of k-major expert keys."""
    T, K = expert_ids_TK.shape
    ids_KT = expert_ids_TK.t().reshape(-1)
    key = torch.where(ids_KT < 0, torch.full_like(ids_KT, num_experts), ids_KT)
    order = torch.sort(key, stable=True).indices  # positions in k-major flat order
    counts_E = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    # k-major position p = k*T + t  ->  slot index t*K + k
    slot_idx = (order % T) * K + order // T
    # Empty slots (-1) sorted last; trimming them costs one host sync on CUDA.
    num_assigned = int(counts_E.sum())
    return slot_idx[:num_assigned], counts_E


def _sort_by_counting(expert_ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """csrc/sort.cpp: a histogram, then one scatter (CPU)."""
    return ext.op("sort_slots")(expert_ids_TK, num_experts)


# up to this many slots (decode: a few tokens x top-k) the order is built in Python:
# ~12 tensor ops cost ~150 us per decode step of the fine layer when its data is out of
# cache, a Python sort of 8 slots a few microseconds
HOST_MAX_SLOTS = 64


def _sort_on_host(expert_ids_TK: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sort_slots_by_expert for a handful of slots: the same order, by (expert, k, t)."""
    K = expert_ids_TK.shape[1]
    slots = sorted((e, k, t) for t, row in enumerate(expert_ids_TK.tolist()) for k, e in enumerate(row) if e >= 0)
    counts = [0] * num_experts
    for e, _, _ in slots:
        counts[e] += 1
    return (torch.tensor([t * K + k for _, k, t in slots], dtype=torch.int64),
            torch.tensor(counts, dtype=torch.int64))


def permute(x_TD: torch.Tensor, token_idx_R: torch.Tensor) -> torch.Tensor:
    """Rows of x in routed order: x_RD[r] = x_TD[token_idx_R[r]]."""
    return x_TD.index_select(0, token_idx_R)


def unpermute(rows_RD: torch.Tensor, token_idx_R: torch.Tensor, num_tokens: int,
              weights_R: torch.Tensor | None = None) -> torch.Tensor:
    """Sum rows back to their tokens, optionally weighted: y_TD[t] = Σ_{r: tok r = t} w_r rows_r."""
    if weights_R is not None:
        rows_RD = rows_RD * weights_R.to(rows_RD.dtype).unsqueeze(-1)
    y_TD = rows_RD.new_zeros(num_tokens, rows_RD.shape[-1])
    return y_TD.index_add(0, token_idx_R, rows_RD)

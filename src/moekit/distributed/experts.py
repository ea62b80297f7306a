"""EPExperts: a drop-in for ExpertBank holding this rank's slice of the experts and
running steps 3-4 of the layer across ranks.

    plan (local routing, rows sorted by GLOBAL expert id)
      ─a permute──▶ x_RD rows in expert order = contiguous by destination rank
      ─b counts───▶ all-to-all of counts_E: how many rows each rank sends me, per local expert
      ─c dispatch─▶ all-to-all of rows (uneven splits) → x_rD grouped by (source, local expert)
      ─d experts──▶ the bank's implementation on x_rD with local expert ids
      ─e combine──▶ reverse all-to-all → out_RD in plan order → weighted sum into y_TD

Rank r holds experts [r·E/ep, (r+1)·E/ep) under the parameter names of ExpertBank
(w_in, w_out), so state_dict keys do not change; only the leading dim is local.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.distributed.comm import all_to_all_rows, exchange_counts
from moekit.distributed.groups import ParallelGroups
from moekit.moe.experts import EXPERTS_IMPLS, ExpertBank, Experts
from moekit.moe.experts.cpu import CpuState
from moekit.moe.types import DispatchPlan
from moekit.ops.sort import unpermute


class EPExperts(Experts):
    def __init__(self, bank: ExpertBank, groups: ParallelGroups) -> None:
        super().__init__()
        E, ep = bank.num_experts, groups.ep_size
        if E % ep:
            raise ValueError(f"expert_parallel: num_experts={E} is not divisible by the "
                             f"expert-parallel size ep={ep}; choose ep among the divisors of {E}")
        names = sorted(n for n, _ in bank.named_parameters())
        if names != ["w_in", "w_out"]:
            raise NotImplementedError(f"expert_parallel: {type(bank).__name__} with parameters "
                                      f"{names}; only ExpertBank (w_in, w_out) is supported")
        self.groups = groups
        self.num_experts = E
        self.num_local_experts = E // ep
        self.expert_offset = groups.ep_rank * self.num_local_experts
        self.act, self.impl = bank.act, bank.impl
        self._fn, self.cpu_state = EXPERTS_IMPLS.get(bank.impl), CpuState()
        lo, hi = self.expert_offset, self.expert_offset + self.num_local_experts
        self.w_in = nn.Parameter(bank.w_in.detach()[lo:hi].clone(), bank.w_in.requires_grad)
        self.w_out = nn.Parameter(bank.w_out.detach()[lo:hi].clone(), bank.w_out.requires_grad)

    def extra_repr(self) -> str:
        return (f"experts {self.expert_offset}..{self.expert_offset + self.num_local_experts - 1} "
                f"of {self.num_experts}, ep={self.groups.ep_size}")

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        ep, group = self.groups.ep_size, self.groups.ep_group
        x_RD = x_TD.index_select(0, plan.token_idx_R)  # a: expert order = rank order
        recv_counts_PL = exchange_counts(plan.counts_E, group, ep)  # b
        send_splits = plan.counts_E.view(ep, -1).sum(1).tolist()
        recv_splits = recv_counts_PL.sum(1).tolist()
        x_rD = all_to_all_rows(x_RD, recv_splits, send_splits, group)  # c
        out_rD = self._local_experts(x_rD, recv_counts_PL)  # d
        out_RD = all_to_all_rows(out_rD, send_splits, recv_splits, group)  # e
        return unpermute(out_RD, plan.token_idx_R, plan.num_tokens, plan.weights_R)

    def _local_experts(self, x_rD: torch.Tensor, recv_counts_PL: torch.Tensor) -> torch.Tensor:
        """Expert outputs of the received rows, in received order (no weights: the
        combine weights live with the token's own rank and are applied there)."""
        plan = local_plan(recv_counts_PL, x_rD.shape[0])
        return self._fn(x_rD, plan, self.w_in, self.w_out, self.act, self.cpu_state)


def local_plan(recv_counts_PL: torch.Tensor, num_rows: int) -> DispatchPlan:
    """A DispatchPlan over the received rows: each row is its own "token" (weight 1),
    rows ordered by local expert. Received rows come grouped by (source rank, local
    expert); a stable sort by local expert keeps source order inside an expert."""
    ep, L = recv_counts_PL.shape
    device = recv_counts_PL.device
    expert_r = torch.repeat_interleave(torch.arange(L, device=device).repeat(ep),
                                       recv_counts_PL.reshape(-1), output_size=num_rows)
    order_r = torch.sort(expert_r, stable=True).indices
    counts_L = recv_counts_PL.sum(0)
    ones_r = torch.ones(num_rows, dtype=torch.float32, device=device)
    return DispatchPlan(token_idx_R=order_r, slot_idx_R=order_r, weights_R=ones_r,
                        counts_E=counts_L, requested_E=counts_L, num_tokens=num_rows, top_k=1)

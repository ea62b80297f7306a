"""DeepSeek-V3 routing (DeepSeek-AI 2024, §2.1.2 eqs. 12-16).

Scores s = sigmoid(logits). Selection uses s + b, where b is a per-expert bias that is
moved by the aux-loss-free balancing rule (eq. 16) and never enters the combine
weights. Group-limited routing: experts are split into n_group groups, each group is
scored by the sum of its two best biased scores, and only the topk_group best groups
are eligible. Weights are the unbiased scores of the chosen experts, optionally
normalised to sum to 1, then scaled by routed_scaling_factor.
"""

from __future__ import annotations

import torch

from moekit.moe.router.base import ROUTERS, Router, topk_ids
from moekit.moe.types import Routing


def group_limited_mask(select_TE: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """Bool mask (T, E) of experts inside the topk_group best groups."""
    T, E = select_TE.shape
    groups_TGE = select_TE.view(T, n_group, E // n_group)
    group_score_TG = groups_TGE.topk(2, dim=-1).values.sum(-1)
    best_TG = group_score_TG.topk(topk_group, dim=-1).indices
    mask_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, best_TG, True)
    return mask_TG.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)


@ROUTERS.register("topk_sigmoid")
class TopKSigmoidRouter(Router):
    uses_groups = True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        # The balancing bias b of eq. 16; a buffer, not a parameter: it is moved by the
        # sign rule in moekit.moe.balance.bias, never by the optimizer.
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routing:
        logits_TE = self.logits(x_TD)
        scores_TE = torch.sigmoid(logits_TE)
        select_TE = scores_TE.detach() + self.expert_bias
        if self.cfg.n_group > 1:
            mask_TE = group_limited_mask(select_TE, self.cfg.n_group, self.cfg.topk_group)
            select_TE = select_TE.masked_fill(~mask_TE, float("-inf"))
        ids_TK = topk_ids(select_TE, self.top_k)
        weights_TK = scores_TE.gather(-1, ids_TK)
        if self.cfg.normalize_topk:
            weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
        weights_TK = weights_TK * self.cfg.routed_scaling_factor
        # eq. 19: the sequence-wise loss uses scores normalised over all experts
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        return Routing(ids_TK, weights_TK, logits_TE, probs_TE)

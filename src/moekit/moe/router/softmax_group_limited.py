"""Router "softmax_group_limited": DeepSeek-V2 routing (arXiv:2405.04434 §2.2).

p = softmax(logits) over all experts. With n_group > 1 ("group_limited_greedy",
§2.2.2 device-limited routing), each group of experts is scored by its best p and
only the topk_group best groups are eligible. The top-k eligible p are the weights
(optionally renormalised), times routed_scaling_factor.
"""

from __future__ import annotations

import torch

from moekit.moe.router.base import ROUTERS, Router, topk_ids
from moekit.moe.types import Routing


def best_groups_mask(probs_TE: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """Bool (T, E): experts in the topk_group groups with the highest max prob."""
    T, E = probs_TE.shape
    group_score_TG = probs_TE.view(T, n_group, E // n_group).amax(-1)
    best_TG = group_score_TG.topk(topk_group, dim=-1).indices
    mask_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, best_TG, True)
    return mask_TG[:, :, None].expand(T, n_group, E // n_group).reshape(T, E)


@ROUTERS.register("softmax_group_limited")
class SoftmaxGroupLimitedRouter(Router):
    uses_groups = True

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routing:
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        eligible_TE = probs_TE
        if self.cfg.n_group > 1:
            mask_TE = best_groups_mask(probs_TE.detach(), self.cfg.n_group, self.cfg.topk_group)
            eligible_TE = probs_TE.masked_fill(~mask_TE, 0.0)
        ids_TK = topk_ids(eligible_TE.detach(), self.top_k)
        weights_TK = probs_TE.gather(-1, ids_TK)
        if self.cfg.normalize_topk:
            weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
        weights_TK = weights_TK * self.cfg.routed_scaling_factor
        return Routing(ids_TK, weights_TK, logits_TE, probs_TE)

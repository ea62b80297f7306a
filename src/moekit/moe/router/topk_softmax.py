"""Softmax top-k: Switch (k=1, Fedus et al. 2021), GShard and Mixtral (k=2), GPT-OSS.

`softmax_order="before"`: p = softmax(logits) over all experts, keep the top-k p
(optionally renormalised: Mixtral yes, Qwen2-MoE no). `"after"`: take the top-k logits,
softmax over those k (GPT-OSS; equal to "before" with renormalisation).
"""

from __future__ import annotations

import torch

from moekit.moe.router.base import ROUTERS, Router, topk_ids
from moekit.moe.types import Routing
from moekit.ops import route
from moekit.ops.softmax import softmax


@ROUTERS.register("topk_softmax")
class TopKSoftmaxRouter(Router):
    uses_jitter = True

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routing:
        if self.training and self.cfg.jitter_eps > 0:
            # Switch §2.4: multiplicative jitter on the router input, for exploration.
            eps = self.cfg.jitter_eps
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        logits_TE = self.logits(x_TD)
        ids_TK = topk_ids(logits_TE, self.top_k)
        if route.applies(logits_TE, ids_TK):
            # CPU: softmax, the chosen weights and the z-loss's logsumexp in one kernel each
            # way ("after" is "before" renormalised: both are exp(x_i) / Σ_top exp(x_j))
            renormalize = self.cfg.normalize_topk or self.cfg.softmax_order == "after"
            probs_TE, weights_TK, lse_T = route.route_softmax(logits_TE, ids_TK, renormalize)
            return Routing(ids_TK, weights_TK, logits_TE, probs_TE, lse_T=lse_T)
        probs_TE = softmax(logits_TE)
        if self.cfg.softmax_order == "after":
            weights_TK = softmax(logits_TE.gather(-1, ids_TK))
        else:
            weights_TK = probs_TE.gather(-1, ids_TK)
            if self.cfg.normalize_topk:
                weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        return Routing(ids_TK, weights_TK, logits_TE, probs_TE)

"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice
Routing", §3.1 eqs. 1-2).

Scores S = softmax(logits) over experts for each token; then each expert takes its C
best tokens by S (top-C over the token axis), C = ceil(capacity_factor · T · top_k / E)
(eq. 1: top_k is the average number of experts per token, c in the paper). A token may
be taken by zero, one or several experts, so the Routing has K' = E slots: slot e of
token t holds e if expert e took t, else -1; its weight is S[t, e] (the gating matrix G
of eq. 2). Tokens no expert took pass through the residual only; routing_stats reports
them as `unrouted_fraction`.

NOTE: an expert's choice looks at every token of the batch, so routing is not causal
(a token's experts depend on later tokens); the paper uses it in pre-training only.
Routers do not see the padding mask, so padding tokens compete for the C places.
"""

from __future__ import annotations

import math

import torch

from moekit.moe.router.base import ROUTERS, Router
from moekit.moe.types import Routing
from moekit.ops.softmax import softmax


def expert_capacity(num_tokens: int, cfg) -> int:
    """C of eq. 1, at most T (an expert cannot take a token twice)."""
    return min(num_tokens, math.ceil(cfg.capacity_factor * num_tokens * cfg.top_k / cfg.num_experts))


@ROUTERS.register("expert_choice")
class ExpertChoiceRouter(Router):
    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routing:
        logits_TE = self.logits(x_TD)
        probs_TE = softmax(logits_TE)
        T, E = probs_TE.shape
        C = expert_capacity(T, self.cfg)
        chosen_TE = torch.zeros(T, E, dtype=torch.bool, device=x_TD.device)
        if C > 0:
            top_CE = probs_TE.detach().topk(C, dim=0).indices  # each expert's C best tokens
            chosen_TE.scatter_(0, top_CE, True)
        experts_TE = torch.arange(E, device=x_TD.device).expand(T, E)
        ids_TE = torch.where(chosen_TE, experts_TE, -1)
        weights_TE = probs_TE * chosen_TE
        return Routing(ids_TE, weights_TE, logits_TE, probs_TE)

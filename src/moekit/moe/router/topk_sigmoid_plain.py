"""Router "topk_sigmoid_plain": Llama 4's routing (transformers Llama4Router).

The top-k logits are chosen; each weight is σ(logit) on its own, with no normalisation
and no balancing bias. Llama 4 applies the weight to the token *before* its expert
(models/hf/families/llama4.py), which the expert bank, not the router, does.
"""

from __future__ import annotations

import torch

from moekit.moe.router.base import ROUTERS, Router, topk_ids
from moekit.moe.types import Routing


@ROUTERS.register("topk_sigmoid_plain")
class TopKSigmoidPlainRouter(Router):
    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routing:
        logits_TE = self.logits(x_TD)
        ids_TK = topk_ids(logits_TE, self.top_k)
        weights_TK = torch.sigmoid(logits_TE.gather(-1, ids_TK))
        scores_TE = torch.sigmoid(logits_TE)
        return Routing(ids_TK, weights_TK, logits_TE, scores_TE / scores_TE.sum(-1, keepdim=True))

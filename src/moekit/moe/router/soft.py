"""Dense soft gating: every expert, weighted by softmax(logits) (Jacobs, Jordan, Nowlan
& Hinton 1991, "Adaptive Mixtures of Local Experts", eq. 1: y = Σ_e p_e(x) · o_e(x)).

All E slots are used whatever top_k is (top_k is ignored), so the layer costs E expert
FFNs per token: the dense baseline every sparse router is an approximation of. Use it
with dropless dispatch: capacity dispatch sizes C for top_k slots per token and would
drop most of the E. For Soft MoE (Puigcerver et al. 2023), which mixes tokens into
slots, see `soft_moe`.
"""

from __future__ import annotations

import torch

from moekit.moe.router.base import ROUTERS, Router
from moekit.moe.types import Routing
from moekit.ops.softmax import softmax


@ROUTERS.register("soft")
class SoftRouter(Router):
    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routing:
        logits_TE = self.logits(x_TD)
        probs_TE = softmax(logits_TE)
        T, E = probs_TE.shape
        ids_TE = torch.arange(E, device=x_TD.device).expand(T, E)
        return Routing(ids_TE, probs_TE, logits_TE, probs_TE)

"""GShard top-2 with a random second expert (Lepikhin et al. 2020, Algorithm 1).

Weights of the two best experts are renormalised to g1 + g2 = 1; during training the
second expert is kept only with probability min(1, 2·g2), so tokens with a confident
first choice mostly use one expert. A skipped slot is empty (id -1) and costs no
capacity. At evaluation both experts are always used.
"""

from __future__ import annotations

import torch

from moekit.moe.router.base import ROUTERS, Router, topk_ids
from moekit.moe.types import Routing
from moekit.ops.softmax import softmax


@ROUTERS.register("gshard_random2")
class GShardRandom2Router(Router):
    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        if cfg.top_k != 2:
            raise ValueError(f"MoEConfig.top_k={cfg.top_k!r} is invalid: router 'gshard_random2' needs top_k=2")

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routing:
        logits_TE = self.logits(x_TD)
        probs_TE = softmax(logits_TE)
        ids_TK = topk_ids(logits_TE, 2)
        g_TK = probs_TE.gather(-1, ids_TK)
        weights_TK = g_TK / g_TK.sum(-1, keepdim=True)
        if self.training:
            keep_T = torch.rand_like(weights_TK[:, 1]) < 2.0 * weights_TK[:, 1].detach()
            ids_TK = torch.stack([ids_TK[:, 0], torch.where(keep_T, ids_TK[:, 1], -1)], dim=1)
            weights_TK = torch.stack([weights_TK[:, 0], weights_TK[:, 1] * keep_T], dim=1)
        return Routing(ids_TK, weights_TK, logits_TE, probs_TE)

"""Expert dropout: in training, drop whole routed slots (token t loses expert e for this
step) with probability p, a regulariser on the routing (the MoE analogue of dropping a
unit; cf. the higher "expert dropout" rate of Switch §4.3, which drops inside experts).

Renormalisation: each token's surviving weights are rescaled so that their sum equals
the sum of all its weights before the drop, keeping the output scale without the 1/(1−p)
variance of inverted dropout. A token that loses every slot gets no routed output (the
residual around the layer carries it; routing_stats counts it as unrouted). Balance
losses still see the router's undropped decision.
"""

from __future__ import annotations

import dataclasses

import torch

from moekit.moe.types import Routing


def drop_expert_slots(routing: Routing, p: float, generator: torch.Generator | None = None) -> Routing:
    ids_TK, w_TK = routing.expert_ids_TK, routing.weights_TK
    if p <= 0 or ids_TK.numel() == 0:
        return routing
    u_TK = torch.rand(ids_TK.shape, device=ids_TK.device, generator=generator)
    keep_TK = (u_TK >= p) & (ids_TK >= 0)
    kept_TK = w_TK * keep_TK
    scale_T1 = w_TK.sum(-1, keepdim=True) / kept_TK.sum(-1, keepdim=True).clamp(min=1e-20)
    return dataclasses.replace(routing, expert_ids_TK=torch.where(keep_TK, ids_TK, -1),
                               weights_TK=kept_TK * scale_T1)

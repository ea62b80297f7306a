"""Noisy top-k gating (Shazeer et al. 2017, §2.1 eqs. 3-5 and App. A).

H(x) = x·W_g + ε · softplus(x·W_noise), ε ~ N(0, 1) during training only. The k best
of H are kept and softmaxed. The router also returns the smooth load estimator of
App. A: P(x, i) = Φ((clean_i − kth_excluding(H, k, i)) / noise_std_i), whose sum over
tokens is a differentiable load per expert for the CV² loss.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.layers import linear
from moekit.moe.router.base import ROUTERS, Router
from moekit.moe.types import Routing
from moekit.ops.softmax import softmax


@ROUTERS.register("noisy_topk")
class NoisyTopKRouter(Router):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        # Shazeer initialises both projections to zero; we keep the small normal init
        # for W_g (symmetry breaking without noise at eval) and zero W_noise.
        self.noise_weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.d_model))

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routing:
        clean_TE = self.logits(x_TD)
        k = self.top_k
        if not self.training:
            vals_TK, ids_TK = clean_TE.topk(k, dim=-1)
            weights_TK = softmax(vals_TK)
            return Routing(ids_TK, weights_TK, clean_TE, softmax(clean_TE))
        raw_std_TE = linear(x_TD.to(clean_TE.dtype), self.noise_weight.to(clean_TE.dtype))
        std_TE = torch.nn.functional.softplus(raw_std_TE) + self.cfg.noise_eps
        noisy_TE = clean_TE + torch.randn_like(clean_TE) * std_TE
        m = min(k + 1, self.num_experts)
        top_vals, top_ids = noisy_TE.topk(m, dim=-1)
        ids_TK, vals_TK = top_ids[:, :k], top_vals[:, :k]
        weights_TK = softmax(vals_TK)
        load_E = self._smooth_load(clean_TE, noisy_TE, std_TE, top_vals) if m > k else None
        return Routing(ids_TK, weights_TK, noisy_TE, softmax(noisy_TE), load_E)

    def _smooth_load(self, clean_TE, noisy_TE, std_TE, top_vals_TM) -> torch.Tensor:
        k = self.top_k
        thr_if_in_T1 = top_vals_TM[:, k : k + 1]  # k+1-th largest: the bar if i is in the top k
        thr_if_out_T1 = top_vals_TM[:, k - 1 : k]  # k-th largest: the bar if i is out
        is_in_TE = noisy_TE > thr_if_in_T1
        normal = torch.distributions.Normal(0.0, 1.0)
        p_in = normal.cdf((clean_TE - thr_if_in_T1) / std_TE)
        p_out = normal.cdf((clean_TE - thr_if_out_T1) / std_TE)
        return torch.where(is_in_TE, p_in, p_out).sum(0)

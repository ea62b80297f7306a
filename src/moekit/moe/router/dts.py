"""Dense-to-sparse gate (EvoMoE, Nie et al. 2021, "EvoMoE: An Evolutional Mixture-of-
Experts Training Framework via Dense-To-Sparse Gate", §3.3).

g = softmax((logits + Gumbel noise) / τ)  (noise in training only). Early in training τ
is high and every expert is used, so all experts learn from every token; τ is then
annealed and a threshold θ raised, so fewer experts pass, until the gate is plain top-k:
    frac = min(1, step / anneal_steps)
    τ = temp_start · (temp_end / temp_start)^frac     (geometric, 2.0 -> 0.3 as in §4)
    θ = frac · threshold_end
    a token keeps expert e if g_e >= θ or e is among its top_k; at frac = 1 exactly top_k.
Kept weights are renormalised to sum to 1. The schedule is stepped by the training loop,
`router.step_schedule(step)` (or `step_dts_schedule(model, step)` for every DTS router of a
model); the step is a buffer, so checkpoints resume the schedule.

The Routing has K' = E slots (-1 for dropped experts) while annealing, top_k at the end.
router_options: temp_start (2.0), temp_end (0.3), anneal_steps (1000), threshold_end (1/E).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moekit.moe.router.base import ROUTERS, Router, reject_unknown_options, topk_ids
from moekit.moe.types import Routing
from moekit.ops.softmax import softmax

_OPTIONS = ("temp_start", "temp_end", "anneal_steps", "threshold_end")


@ROUTERS.register("dts")
class DTSRouter(Router):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        opts = cfg.router_options
        self.temp_start = float(opts.get("temp_start", 2.0))
        self.temp_end = float(opts.get("temp_end", 0.3))
        self.anneal_steps = int(opts.get("anneal_steps", 1000))
        self.threshold_end = float(opts.get("threshold_end", 1.0 / cfg.num_experts))
        self.register_buffer("schedule_step", torch.zeros((), dtype=torch.long))

    @classmethod
    def check_config(cls, cfg) -> None:
        opts = cfg.router_options
        reject_unknown_options(cfg, tuple(_OPTIONS))
        for name in ("temp_start", "temp_end"):
            v = opts.get(name, 1.0)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"MoEConfig.router_options[{name!r}]={v!r} is invalid: must be a finite number > 0")
        n = opts.get("anneal_steps", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"MoEConfig.router_options['anneal_steps']={n!r} is invalid: must be a positive integer")
        th = opts.get("threshold_end", 0.0)
        if not isinstance(th, (int, float)) or isinstance(th, bool) or not 0.0 <= th <= 1.0:
            raise ValueError(f"MoEConfig.router_options['threshold_end']={th!r} is invalid: must be in [0, 1]")

    def step_schedule(self, step: int) -> None:
        """Set the schedule position (the optimizer step count); call once per step."""
        self.schedule_step.fill_(int(step))

    def schedule(self) -> tuple[float, float, float]:
        """(frac, τ, θ) at the current step. Reading the step buffer is one host sync per
        forward on CUDA; it keeps the schedule in checkpoints."""
        frac = min(1.0, int(self.schedule_step) / self.anneal_steps)
        tau = self.temp_start * (self.temp_end / self.temp_start) ** frac
        return frac, tau, frac * self.threshold_end

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routing:
        logits_TE = self.logits(x_TD)
        frac, tau, theta = self.schedule()
        noisy_TE = logits_TE
        if self.training:
            u_TE = torch.rand_like(logits_TE).clamp(1e-20, 1.0 - 1e-7)
            noisy_TE = logits_TE - torch.log(-torch.log(u_TE))  # + Gumbel(0, 1)
        g_TE = softmax(noisy_TE / tau)
        if frac >= 1.0:  # the end of the schedule: plain top-k
            ids_TK = topk_ids(g_TE.detach(), self.top_k)
            w_TK = g_TE.gather(-1, ids_TK)
            return Routing(ids_TK, w_TK / w_TK.sum(-1, keepdim=True), logits_TE, softmax(logits_TE))
        T, E = g_TE.shape
        keep_TE = g_TE.detach() >= theta
        keep_TE.scatter_(1, topk_ids(g_TE.detach(), self.top_k), True)
        ids_TE = torch.where(keep_TE, torch.arange(E, device=x_TD.device).expand(T, E), -1)
        w_TE = g_TE * keep_TE
        return Routing(ids_TE, w_TE / w_TE.sum(-1, keepdim=True), logits_TE, softmax(logits_TE))


def step_dts_schedule(model: nn.Module, step: int) -> int:
    """Step every DTS router inside model; returns how many were stepped."""
    routers = [m for m in model.modules() if isinstance(m, DTSRouter)]
    for r in routers:
        r.step_schedule(step)
    return len(routers)

"""MoELayer: route -> dispatch -> experts -> combine, plus shared experts and balance.

    x_TD ──1 route───▶ Routing(expert_ids_TK, weights_TK, logits_TE, probs_TE)
         ──2 dispatch─▶ DispatchPlan(token_idx_R sorted by expert, weights_R, counts_E)
         ──3 experts──▶ ┐ one call of the expert bank (moe/experts/bank.py: the seam);
         ──4 combine──▶ ┘ it returns y_TD, the weighted sum back in token order
         (+ PR-MoE residual mix, + shared experts on x_TD)
    side path: balance(Routing) -> aux_loss, losses; routing_stats -> stats

Soft MoE mixes tokens into slots instead of routing them (moe/router/soft_moe.py): a
router that says so (`mixes_tokens`) takes `_soft_moe`, decided when the layer is built.
Inference-only fusions (a whole decode step in one kernel) wrap a built layer from
outside: moekit/inference/fused_decode.py.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.moe.balance import cv2_loss, router_z_loss, routing_stats, seq_aux_loss, switch_aux_loss
from moekit.moe.config import MoEConfig
from moekit.moe.dispatch import DISPATCHERS
from moekit.moe.experts import ExpertBank, SharedExperts
from moekit.moe.experts.residual import ResidualMix
from moekit.moe.router import build_router
from moekit.moe.router.expert_dropout import drop_expert_slots
from moekit.moe.types import DispatchPlan, MoEOutput, Routing


class MoELayer(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.router = build_router(cfg)
        self.mixes_tokens = bool(getattr(self.router, "mixes_tokens", False))
        self.dispatch = DISPATCHERS.get(cfg.dispatch)
        self.experts = ExpertBank(cfg.num_experts, cfg.d_model, cfg.d_ff, cfg.expert, cfg.experts_impl, cfg.init_std)
        self.shared = None
        if cfg.num_shared_experts:
            self.shared = SharedExperts(cfg.d_model, cfg.shared_d_ff or cfg.d_ff, cfg.num_shared_experts,
                                        cfg.expert, cfg.shared_gate, cfg.init_std)
        self.residual = None if cfg.residual_d_ff is None else ResidualMix(
            cfg.d_model, cfg.residual_d_ff, cfg.expert, cfg.init_std)

    def forward(self, x: torch.Tensor, *, token_ids: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> MoEOutput:
        """x (..., D) -> MoEOutput(y (..., D), aux_loss, losses, stats).

        token_ids (...): token ids for routers that use them (hash routing).
        mask (...): True for real tokens; padding is left out of the balance losses.
        """
        x_TD = self.flatten(x)
        if self.mixes_tokens:
            return self._soft_moe(x, x_TD, mask)
        token_ids_T = None if token_ids is None else token_ids.reshape(-1)
        routing = self.router(x_TD, token_ids_T)  # 1 route
        plan = self.dispatch(self._expert_dropout(routing), self.cfg)  # 2 dispatch
        y_TD = self.experts(x_TD, plan)  # 3 experts + 4 combine
        y_TD = self.dense_paths(x_TD, y_TD)  # + residual mix, + shared experts
        return self.output(x, y_TD, routing, plan, mask)  # balance losses and stats

    def flatten(self, x: torch.Tensor) -> torch.Tensor:
        D = self.cfg.d_model
        if x.dim() == 0 or x.shape[-1] != D:
            raise ValueError(f"MoELayer: input of shape {tuple(x.shape)} has last dim "
                             f"{x.shape[-1] if x.dim() else None}; expected d_model={D}")
        return x.reshape(-1, D)

    def _expert_dropout(self, routing: Routing) -> Routing:
        p = self.cfg.expert_dropout
        return drop_expert_slots(routing, p) if self.training and p > 0 else routing

    def dense_paths(self, x_TD: torch.Tensor, y_TD: torch.Tensor) -> torch.Tensor:
        """PR-MoE residual mix (moe/experts/residual.py), then the shared experts."""
        if self.residual is not None:
            y_TD = self.residual(x_TD, y_TD)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD

    def output(self, x: torch.Tensor, y_TD: torch.Tensor, routing: Routing, plan: DispatchPlan,
               mask: torch.Tensor | None) -> MoEOutput:
        """The layer's answer: y in x's shape, the weighted aux loss, the losses, the stats."""
        losses = self._balance_losses(routing, tuple(x.shape[:-1]), mask)
        aux = sum((coef * losses[name] for name, coef in self._coefs() if coef > 0),
                  start=y_TD.new_zeros((), dtype=torch.float32))
        return MoEOutput(y_TD.view(x.shape), aux, losses, routing_stats(routing, plan))

    def _soft_moe(self, x: torch.Tensor, x_TD: torch.Tensor, mask) -> MoEOutput:
        """Soft MoE (moe/router/soft_moe.py): tokens mix into slots, experts run on slots."""
        S = x.shape[-2] if x.dim() >= 3 else x.shape[0]
        x_BSD = x_TD.view(x_TD.shape[0] // S if S else 0, S, self.cfg.d_model)  # empty: no sequence
        slots = self.router.slots(x_BSD, None if mask is None else mask.reshape(x_BSD.shape[:2]))
        plan = DISPATCHERS.get("dropless")(slots.routing, self.cfg)
        y_TD = self.router.combine(self.experts(slots.x_XD, plan), slots.combine_BSX).reshape(x_TD.shape)
        y_TD = self.dense_paths(x_TD, y_TD)
        zero = x_TD.new_zeros((), dtype=torch.float32)
        return MoEOutput(y_TD.view(x.shape), zero, {}, routing_stats(slots.routing, plan))

    def _coefs(self) -> list[tuple[str, float]]:
        c = self.cfg
        return [("switch", c.aux_loss_coef), ("cv2", c.cv2_loss_coef), ("z", c.z_loss_coef),
                ("seq_aux", c.seq_aux_loss_coef), ("entropy", c.entropy_loss_coef)]

    def _balance_losses(self, routing: Routing, batch_shape, mask) -> dict[str, torch.Tensor]:
        """The losses whose coefficient is set (unweighted); the rest are not computed."""
        fns = {
            "switch": lambda: switch_aux_loss(routing, mask),
            "cv2": lambda: cv2_loss(routing, mask),
            "z": lambda: router_z_loss(routing, mask),
            "seq_aux": lambda: seq_aux_loss(routing, batch_shape, mask),
            "entropy": lambda: routing.extra_losses["entropy"],  # DSelect-k eq. 9
        }
        return {name: fns[name]() for name, coef in self._coefs() if coef > 0}

"""Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts", §2.1).

Soft MoE is not a per-token routing: each expert gets P slots, and every slot is a
convex mix of all tokens of one sequence; each token's output is a convex mix of all
slot outputs. With logits L = X·Φ (Φ: one column per slot, S = E·P slots):
    dispatch D = softmax over tokens of L   (eq. 1)   slot inputs  X̃ = Dᵀ X
    combine  C = softmax over slots of L    (eq. 2)   outputs      Y = C · expert(X̃)
So this router returns `SoftSlots` instead of a `Routing`, and the layer takes a short
separate path (MoELayer._soft_moe) that feeds the slots to the same ExpertBank through a
fixed plan (slot s -> expert s // P). Every expert sees exactly B·P slots, so no balance
loss applies (the layer returns none) and nothing is ever dropped.

Why a router and not an expert kind: the mixing replaces steps 1-2 (route, dispatch)
and step 4 (combine) while step 3 (the experts) is unchanged, so the experts, their
backends and checkpoints are shared with every other router.

Sequences are the input's leading dims except the last (B, S, D -> B of S; a 2-D input
is one sequence). Mixing runs over a whole sequence, so it is not causal: the paper
uses it for encoders (ViT); do not use it in an autoregressive decoder.
router_options: slots_per_expert (P, default 1); normalize (default True: l2-normalise
X and Φ with a learned scale, §2.3, needed at large d_model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moekit.moe.router.base import ROUTERS, Router, reject_unknown_options, router_dtype
from moekit.moe.types import Routing


@dataclass(frozen=True)
class SoftSlots:
    """Slot inputs in expert-major order (expert e owns rows e·B·P ... (e+1)·B·P - 1)."""

    x_XD: torch.Tensor  # (E·B·P, D) slot inputs, x's dtype
    combine_BSX: torch.Tensor  # (B, S, E·P) combine weights over one sequence's slots, router dtype
    routing: Routing  # the fixed slot -> expert routing the dispatcher groups


@ROUTERS.register("soft_moe")
class SoftMoERouter(Router):
    mixes_tokens = True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.slots_per_expert = int(cfg.router_options.get("slots_per_expert", 1))
        self.normalize = bool(cfg.router_options.get("normalize", True))
        # Φ: one row per slot (row e·P + p is slot p of expert e); replaces the (E, D) weight
        self.weight = nn.Parameter(torch.empty(cfg.num_experts * self.slots_per_expert, cfg.d_model))
        self.scale = nn.Parameter(torch.ones(())) if self.normalize else None
        self.reset_parameters()

    @classmethod
    def check_config(cls, cfg) -> None:
        opts = cfg.router_options
        reject_unknown_options(cfg, ("slots_per_expert", "normalize"))
        P = opts.get("slots_per_expert", 1)
        if not isinstance(P, int) or isinstance(P, bool) or P <= 0:
            raise ValueError(f"MoEConfig.router_options['slots_per_expert']={P!r} is invalid: "
                             "must be a positive integer")
        if cfg.router_bias:
            raise ValueError("MoEConfig.router_bias=True is invalid: router 'soft_moe' has no bias")
        for name in ("aux_loss_coef", "cv2_loss_coef", "z_loss_coef", "seq_aux_loss_coef", "expert_dropout"):
            if getattr(cfg, name):
                raise ValueError(f"MoEConfig.{name}={getattr(cfg, name)!r} is invalid: must be 0 with router "
                                 "'soft_moe' (every expert gets the same number of slots; no per-token routing)")

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routing:
        raise TypeError("router 'soft_moe' mixes tokens into slots; use MoELayer, which calls .slots()")

    def slots(self, x_BSD: torch.Tensor, mask_BS: torch.Tensor | None = None) -> SoftSlots:
        B, S, D = x_BSD.shape
        E, P = self.num_experts, self.slots_per_expert
        dt = router_dtype(x_BSD)
        x32, phi_XD = x_BSD.to(dt), self.weight.to(dt)
        if self.normalize:  # §2.3: l2-normalise tokens and slot parameters, learned scale
            x32 = nn.functional.normalize(x32, dim=-1)
            phi_XD = self.scale * nn.functional.normalize(phi_XD, dim=-1)
        logits_BSX = torch.einsum("bsd,xd->bsx", x32, phi_XD)
        masked_BSX = logits_BSX
        if mask_BS is not None:  # padding never enters a slot
            masked_BSX = logits_BSX.masked_fill(~mask_BS.bool().unsqueeze(-1), float("-inf"))
        dispatch_BSX = torch.softmax(masked_BSX, dim=1).nan_to_num(0.0)  # all-padding sequence
        combine_BSX = torch.softmax(logits_BSX, dim=2)
        slots_BXD = torch.einsum("bsx,bsd->bxd", dispatch_BSX, x_BSD.to(dt))
        # expert-major rows: (B, E, P, D) -> (E, B, P, D)
        x_XD = slots_BXD.view(B, E, P, D).transpose(0, 1).reshape(E * B * P, D).to(x_BSD.dtype)
        return SoftSlots(x_XD, combine_BSX, self._slot_routing(E, B * P, x_BSD.device, dt))

    @staticmethod
    def _slot_routing(E: int, per_expert: int, device, dtype) -> Routing:
        ids_X1 = torch.arange(E, device=device).repeat_interleave(per_expert).unsqueeze(1)
        one_hot_XE = nn.functional.one_hot(ids_X1[:, 0], E).to(dtype)
        return Routing(ids_X1, torch.ones(ids_X1.shape, device=device, dtype=dtype), one_hot_XE, one_hot_XE)

    def combine(self, y_XD: torch.Tensor, combine_BSX: torch.Tensor) -> torch.Tensor:
        """Expert outputs of the slots (expert-major) -> y_BSD = C · Ỹ per sequence."""
        B, E, P, D = combine_BSX.shape[0], self.num_experts, self.slots_per_expert, y_XD.shape[-1]
        y_BXD = y_XD.view(E, B, P, D).transpose(0, 1).reshape(B, E * P, D)
        return torch.einsum("bsx,bxd->bsd", combine_BSX.to(y_XD.dtype), y_BXD)

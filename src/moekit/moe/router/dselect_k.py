"""DSelect-k (Hazimeh et al. 2021, "DSelect-k: Differentiable Selection in the Mixture
of Experts", §3, per-example gating).

k selectors each choose one expert through a smooth binary code: with m = ceil(log2 E)
bits, selector i has codes z_i = W_i x (m values) and puts on expert l the mass
    r_i(l) = Π_j  S(z_ij) if bit j of l is 1, else 1 − S(z_ij)            (eq. 5)
where S is the cubic smooth-step (eq. 4): 0 below −γ/2, 1 above γ/2, smooth between.
A softmax over k learned logits α = W_α x mixes the selectors: q = Σ_i α_i r_i (eq. 6),
and y = Σ_l q_l f_l(x). S reaches exactly 0 and 1, so once every z_ij has left
(−γ/2, γ/2) each r_i is one-hot and at most k experts have q > 0: the routing is sparse
in training as well as inference. The entropy of each r_i, summed over selectors and
averaged over tokens (eq. 9), pushes the codes there; it is returned as the loss
"entropy" and weighted by MoEConfig.entropy_loss_coef.

The Routing has K' = E slots: slot l holds l where q_l > 0, else -1 (dense at the
start, at most k live slots once converged). When E is not a power of two, code l >= E
folds onto expert l mod E so every selector stays a distribution over the E experts.
router_options: gamma (smooth-step width γ, default 1.0).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moekit.moe.router.base import ROUTERS, Router, reject_unknown_options
from moekit.moe.types import Routing


def smooth_step(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Eq. 4: −2/γ³ t³ + 3/(2γ) t + 1/2 on [−γ/2, γ/2], clamped to 0 / 1 outside."""
    inner = -2.0 / gamma**3 * t**3 + 1.5 / gamma * t + 0.5
    return torch.where(t <= -gamma / 2, 0.0, torch.where(t >= gamma / 2, 1.0, inner))


def code_bits(num_bits: int, device=None) -> torch.Tensor:
    """(2^m, m) float matrix: row l is the binary code of l (bit j = (l >> j) & 1)."""
    codes_L = torch.arange(2**num_bits, device=device)
    return ((codes_L.unsqueeze(1) >> torch.arange(num_bits, device=device)) & 1).float()


@ROUTERS.register("dselect_k")
class DSelectKRouter(Router):
    extra_losses = ("entropy",)

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.num_bits = math.ceil(math.log2(cfg.num_experts)) if cfg.num_experts > 1 else 0
        self.gamma = float(cfg.router_options.get("gamma", 1.0))
        k, m = cfg.top_k, self.num_bits
        # the (E, D) base projection is unused; this one emits k·m codes and k mixing logits
        self.weight = nn.Parameter(torch.empty(k * m + k, cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(k * m + k)) if cfg.router_bias else None
        self.register_buffer("bits_LM", code_bits(m), persistent=False)
        self.reset_parameters()

    @classmethod
    def check_config(cls, cfg) -> None:
        opts = cfg.router_options
        reject_unknown_options(cfg, ("gamma",))
        g = opts.get("gamma", 1.0)
        if not isinstance(g, (int, float)) or isinstance(g, bool) or not math.isfinite(g) or g <= 0:
            raise ValueError(f"MoEConfig.router_options['gamma']={g!r} is invalid: must be a finite number > 0")

    def selectors(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """r_TKE (each selector's distribution over experts) and alpha_TK (mixing softmax)."""
        T, k, m, E = x_TD.shape[0], self.top_k, self.num_bits, self.num_experts
        h = self.logits(x_TD)  # (T, k·m + k) fp32
        s_TKM = smooth_step(h[:, : k * m].view(T, k, m), self.gamma)
        bits_LM = self.bits_LM
        # r(l) = Π_j (bit ? S : 1 − S)   (eq. 5)
        factors_TKLM = bits_LM * s_TKM.unsqueeze(2) + (1 - bits_LM) * (1 - s_TKM.unsqueeze(2))
        r_TKL = factors_TKLM.prod(-1)
        if r_TKL.shape[-1] != E:  # fold codes >= E onto l mod E
            fold_L = torch.arange(r_TKL.shape[-1], device=x_TD.device) % E
            r_TKL = r_TKL.new_zeros(T, k, E).index_add_(2, fold_L, r_TKL)
        return r_TKL, torch.softmax(h[:, k * m :], dim=-1)

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routing:
        r_TKE, alpha_TK = self.selectors(x_TD)
        q_TE = torch.einsum("tk,tke->te", alpha_TK, r_TKE)  # eq. 6
        T, E = q_TE.shape
        live_TE = q_TE.detach() > 0
        ids_TE = torch.where(live_TE, torch.arange(E, device=x_TD.device).expand(T, E), -1)
        entropy_TK = -(r_TKE * torch.log(r_TKE.clamp(min=1e-20))).sum(-1)  # eq. 9
        entropy = entropy_TK.sum(-1).mean() if T else q_TE.new_zeros(())
        # logits for z-loss / stats: log q (z-loss is then log(Σq)² = 0: q is normalised)
        logits_TE = torch.log(q_TE.clamp(min=1e-20))
        return Routing(ids_TE, q_TE * live_TE, logits_TE, q_TE, extra_losses={"entropy": entropy})

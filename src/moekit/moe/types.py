"""Small frozen contracts passed between the layer's stages.

Shape legend (used in every tensor name in moekit):
  T tokens (leading dims of the input flattened), D model width, E routed experts,
  K expert slots per token, R routed rows (T*K, fewer after drops), F expert hidden
  width, N expert input-projection width (2F for gated experts, F otherwise),
  B batch, S sequence length.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Routing:
    """What a router decides for T tokens.

    expert_ids_TK: int64 expert per slot; -1 marks an empty slot (no expert), which
        routers with a variable number of experts per token use.
    weights_TK: combine weight per slot (fp32, differentiable; 0 for empty slots).
    logits_TE: raw router logits in fp32 (for z-loss and entropy).
    probs_TE: the score distribution the balance losses use (softmax probs, or
        normalised sigmoid scores), fp32, rows sum to 1.
    load_E: optional differentiable load estimate (noisy top-k, Shazeer 2017 §4).
    extra_losses: router-specific unweighted losses by name (DSelect-k's "entropy");
        the layer weights each with its MoEConfig coefficient.
    lse_T: optional logsumexp(logits_TE) per token, differentiable, when the router
        computed it anyway (the z-loss then reads it instead of recomputing).
    """

    expert_ids_TK: torch.Tensor
    weights_TK: torch.Tensor
    logits_TE: torch.Tensor
    probs_TE: torch.Tensor
    load_E: torch.Tensor | None = None
    extra_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    lse_T: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return self.logits_TE.shape[-1]


@dataclass(frozen=True)
class DispatchPlan:
    """Routed rows grouped by expert.

    token_idx_R: source token of each row, rows sorted by expert (int64).
    slot_idx_R: flat index t*K+k of each row into weights_TK (int64).
    weights_R: combine weight of each row (differentiable gather of weights_TK).
    counts_E: rows per expert after drops (int64, sums to R).
    requested_E: slots assigned per expert before drops (int64).
    num_tokens: T.
    top_k: K, the slots per token (slot_idx_R < T·K); 0 where the plan does not say
        (the expert bank then scatter-adds rows into y instead of summing slots).
    """

    token_idx_R: torch.Tensor
    slot_idx_R: torch.Tensor
    weights_R: torch.Tensor
    counts_E: torch.Tensor
    requested_E: torch.Tensor
    num_tokens: int
    capacity: int | None = None
    top_k: int = 0

    @property
    def num_rows(self) -> int:
        return self.token_idx_R.shape[0]


def _entropy(p_TE: torch.Tensor) -> torch.Tensor:
    if not p_TE.shape[0]:
        return p_TE.new_zeros(())
    return -(p_TE * torch.log(p_TE.clamp(min=1e-20))).sum(-1).mean()


class RoutingStats:
    """Detached routing metrics of one forward (no host sync needed to build them).

    Each is computed on first read from the forward's counts and probabilities, then
    kept: a training step that logs them pays ~10 small ops per layer, a decode step
    that never reads them pays nothing.
    """

    FIELDS = ("tokens_per_expert", "requested_per_expert", "drop_fraction", "router_entropy",
              "dead_experts", "unrouted_fraction")

    def __init__(self, counts_E: torch.Tensor, requested_E: torch.Tensor, probs_TE: torch.Tensor,
                 token_idx_R: torch.Tensor, num_tokens: int) -> None:
        self.tokens_per_expert = counts_E.detach()  # (E,) rows kept per expert
        self.requested_per_expert = requested_E.detach()  # (E,) slots assigned before capacity drops
        self._p_TE, self._token_idx_R, self._num_tokens = probs_TE.detach(), token_idx_R, num_tokens

    @functools.cached_property
    def drop_fraction(self) -> torch.Tensor:
        """() dropped slots / assigned slots."""
        assigned = self.requested_per_expert.sum().float()
        kept = self.tokens_per_expert.sum().float()
        return torch.where(assigned > 0, 1.0 - kept / assigned.clamp(min=1.0), torch.zeros_like(assigned))

    @functools.cached_property
    def router_entropy(self) -> torch.Tensor:
        """() mean entropy (nats) of probs_TE."""
        return _entropy(self._p_TE)

    @functools.cached_property
    def dead_experts(self) -> torch.Tensor:
        """() experts that received no token."""
        return (self.tokens_per_expert == 0).sum()

    @functools.cached_property
    def unrouted_fraction(self) -> torch.Tensor:
        """() tokens with no expert at all (after drops)."""
        if not self._p_TE.shape[0]:
            return self._p_TE.new_zeros(())
        per_token = torch.bincount(self._token_idx_R, minlength=self._num_tokens)
        return (per_token == 0).float().mean()

    def __getattr__(self, name: str):  # only reached for names that do not exist
        raise AttributeError(f"RoutingStats has no field {name!r}; fields: {', '.join(self.FIELDS)}")

    def __repr__(self) -> str:
        return "RoutingStats(" + ", ".join(f"{n}={getattr(self, n)!r}" for n in self.FIELDS) + ")"


@dataclass(frozen=True)
class MoEOutput:
    """The layer's answer: y like the input, the weighted aux loss, named losses, stats."""

    y: torch.Tensor
    aux_loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    stats: RoutingStats

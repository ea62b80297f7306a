"""Aux-loss-free balancing (DeepSeek-V3 §2.1.2, Wang et al. 2024): after each optimizer
step, b_i += γ · sign(mean load − load_i). The bias enters expert selection only."""

from __future__ import annotations

import torch


@torch.no_grad()
def update_expert_bias(expert_bias_E: torch.Tensor, load_E: torch.Tensor, rate: float) -> torch.Tensor:
    """Move the bias in place toward uniform load; load_E is the slot count per expert
    accumulated over the step's micro-batches. Returns the applied delta."""
    load_E = load_E.float()
    delta_E = rate * torch.sign(load_E.mean() - load_E)
    expert_bias_E.add_(delta_E)
    return delta_E

"""The expert bank: stacked weights of E experts and a backend chosen by name."""

from __future__ import annotations

import torch
from torch import nn

from moekit.moe.experts.activations import ACTIVATIONS
from moekit.moe.experts.grouped import grouped_experts
from moekit.moe.experts.loop import loop_experts
from moekit.moe.types import DispatchPlan
from moekit.registry import Registry

BACKENDS: Registry = Registry("expert_backend")
BACKENDS.register("grouped")(grouped_experts)
BACKENDS.register("loop")(loop_experts)


class ExpertBank(nn.Module):
    """w_in (E, N, D) with N = [gate | up] for gated kinds, w_out (E, D, F): the layout of
    transformers' `gate_up_proj` / `down_proj`, so HF weights load without a transpose."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, kind: str = "swiglu",
                 backend: str = "grouped", init_std: float = 0.02) -> None:
        super().__init__()
        self.act = ACTIVATIONS.get(kind)
        self.backend_name = backend
        self.backend = BACKENDS.get(backend)
        n_in = self.act.width_in(d_ff)
        self.w_in = nn.Parameter(torch.randn(num_experts, n_in, d_model) * init_std)
        self.w_out = nn.Parameter(torch.randn(num_experts, d_model, d_ff) * init_std)

    @property
    def num_experts(self) -> int:
        return self.w_in.shape[0]

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan, backend: str | None = None) -> torch.Tensor:
        """Experts and the weighted combine: y_TD = Σ_r w_r · expert_{e(r)}(x_{t(r)})."""
        fn = self.backend if backend is None else BACKENDS.get(backend)
        return fn(x_TD, plan, self.w_in, self.w_out, self.act)

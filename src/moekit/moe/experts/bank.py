"""The expert seam: an expert bank computes steps 3-4 of the layer (experts + combine)
for a dispatch plan, behind one small interface.

    class Experts(nn.Module):
        num_experts: int
        def forward(self, x_TD, plan: DispatchPlan) -> y_TD:   # y_t = Σ_r w_r · expert_e(r)(x_t(r))

`ExpertBank` is the standard one: stacked weights w_in (E, N, D), w_out (E, D, F) and an
implementation chosen by name (MoEConfig.experts_impl), resolved once when the bank is
built, moved (`.to`, `.cuda`, `.double`, ...) or loaded, never per call:

| experts_impl | computes with                                          | device, dtypes                 |
|--------------|--------------------------------------------------------|--------------------------------|
| auto         | "cpu" on the CPU, else "grouped_mm" ("loop" for fp64)  |                                |
| cpu          | the CPU wing: its own path per call (cpu/path.py)      | CPU, any float dtype           |
| grouped_mm   | torch's grouped GEMM, one per projection, no host sync | any device; fp32, bf16, fp16   |
| loop         | a Python loop over experts: the oracle                 | any                            |

Other banks plug in at the same seam (the layer only calls `forward(x_TD, plan)`):
expert parallelism (distributed/experts.py), and wrappers built from outside for LoRA,
quantized or offloaded experts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moekit.moe.experts.activations import ACTIVATIONS, Activation
from moekit.moe.experts.cpu import CpuState, cpu_experts
from moekit.moe.experts.cpu import prepare as cpu_prepare
from moekit.moe.experts.grouped_mm import DTYPES as GROUPED_MM_DTYPES
from moekit.moe.experts.grouped_mm import grouped_mm_experts
from moekit.moe.experts.loop import loop_experts
from moekit.moe.types import DispatchPlan
from moekit.registry import Registry

# name -> fn(x_TD, plan, w_in_END, w_out_EDF, act, cpu_state) -> y_TD
ExpertsImpl = Callable[[torch.Tensor, DispatchPlan, torch.Tensor, torch.Tensor, Activation, CpuState],
                       torch.Tensor]
EXPERTS_IMPLS: Registry[ExpertsImpl] = Registry("experts_impl")
EXPERTS_IMPLS.register("cpu")(cpu_experts)
EXPERTS_IMPLS.register("grouped_mm")(lambda x, plan, w_in, w_out, act, state: grouped_mm_experts(x, plan, w_in, w_out, act))
EXPERTS_IMPLS.register("loop")(lambda x, plan, w_in, w_out, act, state: loop_experts(x, plan, w_in, w_out, act))
IMPL_NAMES = ("auto", *EXPERTS_IMPLS.names())


def resolve_impl(name: str, device: torch.device, dtype: torch.dtype, d_model: int, d_ff: int) -> str:
    """The implementation `name` stands for on this device and dtype (checked: a named
    implementation that cannot run there is an error, not a silent substitute)."""
    if name not in IMPL_NAMES:
        raise ValueError(f"unknown experts_impl {name!r}; valid: {', '.join(IMPL_NAMES)}")
    aligned = grouped_mm_aligned(dtype, d_model, d_ff)
    if name == "auto":
        if device.type in ("cpu", "meta"):
            return "cpu"
        return "grouped_mm" if dtype in GROUPED_MM_DTYPES and aligned else "loop"
    if name == "cpu" and device.type not in ("cpu", "meta"):
        raise ValueError(f"experts_impl='cpu' runs on the CPU, but the experts are on {device}; "
                         "use 'auto' or 'grouped_mm'")
    if name == "grouped_mm" and dtype not in GROUPED_MM_DTYPES:
        raise ValueError(f"experts_impl='grouped_mm' takes float32, bfloat16 or float16, not {dtype}; "
                         "use 'auto', 'cpu' or 'loop'")
    if name == "grouped_mm" and not aligned:
        raise ValueError(f"experts_impl='grouped_mm' needs rows of whole 16 bytes: d_model={d_model} and "
                         f"d_ff={d_ff} in {dtype} are not; use 'auto', 'cpu' or 'loop'")
    return name


def grouped_mm_aligned(dtype: torch.dtype, d_model: int, d_ff: int) -> bool:
    """torch's grouped_mm wants every operand's row stride a multiple of 16 bytes."""
    size = torch.empty(0, dtype=dtype).element_size()
    return (d_model * size) % 16 == 0 and (d_ff * size) % 16 == 0


class Experts(nn.Module):
    """The interface every expert bank implements (see the module docstring)."""

    num_experts: int

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class ExpertBank(Experts):
    """w_in (E, N, D) with N = [gate | up] for gated kinds, w_out (E, D, F): the layout of
    transformers' `gate_up_proj` / `down_proj`, so HF weights load without a transpose."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, kind: str = "swiglu",
                 impl: str = "auto", init_std: float = 0.02) -> None:
        super().__init__()
        self.act = ACTIVATIONS.get(kind)
        self.impl_name = impl
        self.cpu_state = CpuState()
        n_in = self.act.width_in(d_ff)
        self.w_in = nn.Parameter(torch.randn(num_experts, n_in, d_model) * init_std)
        self.w_out = nn.Parameter(torch.randn(num_experts, d_model, d_ff) * init_std)
        self._resolve()
        # load_state_dict(assign=True) may bring the weights to another device or dtype
        self.register_load_state_dict_post_hook(lambda module, _: module._resolve())

    @property
    def num_experts(self) -> int:
        return self.w_in.shape[0]

    def _resolve(self) -> None:
        self.impl = resolve_impl(self.impl_name, self.w_in.device, self.w_in.dtype, self.w_in.shape[2],
                                 self.w_out.shape[2])
        self._fn = EXPERTS_IMPLS.get(self.impl)
        self.cpu_state.packed = None

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        self._resolve()
        return out

    def set_impl(self, name: str) -> None:
        """Switch the implementation (resolved here, once)."""
        self.impl_name = name
        self._resolve()

    def extra_repr(self) -> str:
        E, N, D = self.w_in.shape
        return f"experts={E}, d_model={D}, d_ff={self.w_out.shape[2]}, kind={self.act.name}, impl={self.impl}"

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Experts and the weighted combine: y_TD = Σ_r w_r · expert_{e(r)}(x_{t(r)}).
        Under autocast the experts compute in autocast's dtype, as its matmuls do (the
        casts of the weights are differentiable: gradients reach the fp32 masters)."""
        w_in, w_out = self.w_in, self.w_out
        if torch.is_autocast_enabled(x_TD.device.type):
            dt = torch.get_autocast_dtype(x_TD.device.type)
            x_TD, w_in, w_out = x_TD.to(dt), w_in.to(dt), w_out.to(dt)
        return self._fn(x_TD, plan, w_in, w_out, self.act, self.cpu_state)

    def prepare_for_inference(self) -> None:
        """Make what only inference uses (the CPU wing's packed weights, where its rows
        kernel can run); dropped again when the weights change or a training forward runs."""
        if self.impl == "cpu":
            self.cpu_state.packed = cpu_prepare(self.w_in, self.w_out, self.act)

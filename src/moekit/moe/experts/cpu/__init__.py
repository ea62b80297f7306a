"""The CPU wing of the expert bank: every CPU fast path behind one entry point.

    y_TD = cpu_experts(x_TD, plan, w_in, w_out, act, state)          # path chosen here
    y_TD = cpu_experts(x_TD, plan, w_in, w_out, act, path=CpuPath(kernel="chunked", products="torch"))

cpu/path.py holds the table of paths (which runs when), the frozen `CpuPath` value and
the one function that chooses it; the kernels' Python sides are cpu/decode.py,
cpu/whole.py (whole experts per thread, and the forwards that own tokens) and
cpu/chunked.py (the chunk loop, every dtype: the reference the others are tested
against, as the loop oracle is for it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.moe.experts.activations import Activation
from moekit.moe.experts.cpu.chunked import chunked_experts
from moekit.moe.experts.cpu.decode import decode_experts
from moekit.moe.experts.cpu.packed import Packed, pack
from moekit.moe.experts.cpu.path import ROWS_MAX_D, Call, CpuPath, choose
from moekit.moe.experts.cpu.whole import whole_experts
from moekit.moe.types import DispatchPlan
from moekit.ops import expert_bank as bank_ops
from moekit.ops import ext, gemm

__all__ = ["CpuPath", "CpuState", "cpu_experts", "call_of", "choose", "prepare"]


@dataclass
class CpuState:
    """Per-bank state of the CPU wing: the packed weights `prepare` made, and the path
    the last call took (what a user or a test reads to see which kernel ran)."""

    packed: Packed | None = None
    last_path: CpuPath | None = None


def call_of(x_TD: torch.Tensor, plan: DispatchPlan, counts: list[int], w_in_END: torch.Tensor,
            w_out_EDF: torch.Tensor, act: Activation, packed: bool = False) -> Call:
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, w_in_END, w_out_EDF, plan.weights_R))
    return Call(T=x_TD.shape[0], D=x_TD.shape[1], F=w_out_EDF.shape[2], K=plan.top_k, counts=tuple(counts),
                dtype=x_TD.dtype, act=act.name, grad=grad,
                contiguous=w_in_END.is_contiguous() and w_out_EDF.is_contiguous(), packed=packed)


def cpu_experts(x_TD: torch.Tensor, plan: DispatchPlan, w_in_END: torch.Tensor, w_out_EDF: torch.Tensor,
                act: Activation, state: CpuState | None = None, path: CpuPath | None = None) -> torch.Tensor:
    counts = plan.counts_E.tolist()  # host copy: chunks and segments are planned on the host
    packed = _valid_packed(state, w_in_END, w_out_EDF)
    call = call_of(x_TD, plan, counts, w_in_END, w_out_EDF, act, packed is not None)
    if state is not None and call.grad:
        state.packed = packed = None  # training: the weights are about to change
    path = choose(call) if path is None else path
    _check(path, call)
    if state is not None:
        state.last_path = path
    if path.kernel == "decode":
        return decode_experts(x_TD, plan, counts, w_in_END, w_out_EDF, act)
    if path.kernel == "chunked":
        return chunked_experts(x_TD, plan, counts, w_in_END, w_out_EDF, act, path)
    return whole_experts(x_TD, plan, counts, w_in_END, w_out_EDF, path,
                         None if packed is None else (packed.p_in, packed.p_out))


def prepare(w_in_END: torch.Tensor, w_out_EDF: torch.Tensor, act: Activation) -> Packed | None:
    """The packed weights for the rows kernel when it can run on this bank, else None."""
    D, F = w_out_EDF.shape[1], w_out_EDF.shape[2]
    if not (act.name == "swiglu" and w_in_END.dtype == torch.float32 and w_in_END.device.type == "cpu"
            and ext.caps().avx512 and D % 16 == 0 and F % 16 == 0 and D <= ROWS_MAX_D):
        return None
    return pack(w_in_END, w_out_EDF)


def _valid_packed(state: CpuState | None, w_in_END: torch.Tensor, w_out_EDF: torch.Tensor) -> Packed | None:
    if state is None or state.packed is None:
        return None
    if not state.packed.matches(w_in_END, w_out_EDF):
        state.packed = None  # the weights changed since prepare: the copy is stale
    return state.packed


def _check(path: CpuPath, call: Call) -> None:
    """A path forced through settings.cpu_path must be one this call can run."""
    why = None
    if path.kernel == "chunked":
        if path.products == "onednn" and not gemm.onednn_takes(torch.empty(0, dtype=call.dtype)):
            why = f"oneDNN takes no {call.dtype} products here (settings.gemm, or no bf16 kernels on this CPU)"
    elif not ext.available():
        why = "the C++ kernels are not available (settings.kernels='off', or no build)"
    elif path.kernel != "decode" and not (call.dtype == torch.float32 and call.act == "swiglu" and call.contiguous):
        why = "it takes contiguous float32 SwiGLU experts"
    elif path.kernel == "decode" and call.dtype != torch.float32:
        why = "it takes float32"
    elif path.kernel in ("rows", "columns") and not (ext.caps().avx512 and call.D % 16 == 0):
        why = "it needs an AVX-512 build and a model width that is a multiple of 16"
    elif path.kernel == "rows" and not call.packed:
        why = "it needs the weights packed by moekit.inference.prepare_for_inference"
    elif path.kernel in ("decode", "rows") and call.grad:
        why = "it has no backward"
    elif path.products == "matmul" and not bank_ops.matmul_works():
        why = "oneDNN's matmul does not run on this CPU (torch asks for avx512bw/vl/dq or avx_ne_convert)"
    if why is not None:
        raise ValueError(f"CpuPath(kernel={path.kernel!r}, products={path.products!r}) cannot run this call: {why}")

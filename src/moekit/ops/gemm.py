"""Matrix products on the CPU on whichever kernel is fastest for the shape on this machine,
with torch's own call as the reference and the fallback.

Three kernels compute the same products (fp32 accumulation, rounding aside):
  torch   torch.mm / F.linear: MKL's sgemm in torch's x86 wheels (OpenBLAS elsewhere);
  onednn  oneDNN, which torch bundles, through `torch.ops.mkldnn._linear_pointwise`;
  rowmv   moekit's grouped row mat-vec (ops/rowmv.py), for 1-4 rows (decode).
Which is fastest depends on the CPU: on an AMD EPYC with AVX-512 oneDNN ran 400-430
GFLOP/s against MKL's 180-195; on an AVX2 EPYC both reach ~32 GFLOP/s per core on big
products and MKL wins small ones; on an Intel Xeon MKL's decode mat-vec was 2.5x
oneDNN's (`python benchmarks/gemm.py` prints them side by side). So with
settings.gemm == "auto" each product's shape class (rows rounded up to a power of two,
the weight's shape, the dtype, the operand layout) is timed once per machine
(ops/tune.py) and the winner kept. settings.gemm == "onednn" takes oneDNN wherever it
applies, "torch" never leaves torch.

oneDNN applies to CPU float32 (and bfloat16 where the CPU has oneDNN's bf16 kernels)
2-D operands; it has no autograd formula, so a call autograd would differentiate stays
on torch. moekit calls these functions from its hand-written backward passes (experts,
Linear) and under no_grad.
"""

from __future__ import annotations

import functools

import torch

from moekit import settings
from moekit.ops import ext, rowmv, tune

# oneDNN builds (JIT-compiles) a kernel for every new problem shape: a 551x128 · 128x256
# product took 2.5 ms the first time and 0.2 ms after. An expert's row count changes every
# training step, so the expert bank pads each expert's rows with zero rows to a multiple
# of SHAPE_STEP when its products run on oneDNN (moe/experts/cpu/): oneDNN then sees at
# most max_rows / SHAPE_STEP shapes, each compiled once.
SHAPE_STEP = 32
# below this many multiply-adds a product stays on torch untimed: timing it would cost
# more than any kernel could save (oneDNN's fixed cost per call is ~14 µs, MKL's ~5)
MIN_MACS = 1 << 18
# rows up to which the decode mat-vec kernel is a candidate, and the smallest weight
ROWMV_MAX_ROWS = 4
ROWMV_MIN_WEIGHT = 1 << 16

try:
    _ONEDNN_LINEAR = torch.ops.mkldnn._linear_pointwise.default
except (AttributeError, RuntimeError):  # a build without oneDNN
    _ONEDNN_LINEAR = None
if not torch.backends.mkldnn.is_available():
    _ONEDNN_LINEAR = None


def onednn_available() -> bool:
    return _ONEDNN_LINEAR is not None


@functools.cache
def onednn_bf16() -> bool:
    """Whether oneDNN has bf16 kernels on this CPU (AVX-512 BF16/AMX, avx_ne_convert, or
    the avx512bw/vl/dq emulation; not plain AVX2)."""
    return _ONEDNN_LINEAR is not None and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def onednn_takes(x: torch.Tensor) -> bool:
    """Whether products on tensors like x may run on oneDNN (device, dtype, settings)."""
    return (_ONEDNN_LINEAR is not None and settings.get().gemm != "torch" and x.device.type == "cpu"
            and (x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and onednn_bf16())))


def _onednn_applies(a_MK: torch.Tensor, w_NK: torch.Tensor) -> bool:
    if not onednn_takes(a_MK) or w_NK.dtype != a_MK.dtype:
        return False
    if a_MK.dim() != 2 or w_NK.dim() != 2 or a_MK.numel() == 0 or w_NK.numel() == 0:
        return False
    return not (torch.is_grad_enabled() and (a_MK.requires_grad or w_NK.requires_grad))


def _rowmv_applies(a_MK: torch.Tensor, w_NK: torch.Tensor) -> bool:
    return (a_MK.dim() == 2 and w_NK.dim() == 2 and 0 < a_MK.shape[0] <= ROWMV_MAX_ROWS
            and w_NK.numel() >= ROWMV_MIN_WEIGHT and rowmv.applies(a_MK, w_NK))


def _row_major(a_MK: torch.Tensor) -> torch.Tensor:
    """a in contiguous rows, as oneDNN wants its left operand (it copies any other layout
    itself, with torch's copy_). A transposed view, as in a weight gradient dyᵀ · x, goes
    through csrc/transpose.cpp: 2048 x 128 in 0.05 ms vs copy_'s 0.13 at one thread."""
    if a_MK.stride(-1) == 1 or a_MK.stride(0) != 1 or a_MK.dtype != torch.float32 or not ext.available():
        return a_MK
    out_MK = a_MK.new_empty(a_MK.shape)
    ext.op("transpose_into")(a_MK.t(), out_MK)
    return out_MK


def _onednn(a_MK, w_NK, bias_N):
    return _ONEDNN_LINEAR(_row_major(a_MK), w_NK, bias_N, "none", [], "")


def _torch(a_MK, w_NK, bias_N):
    return torch.nn.functional.linear(a_MK, w_NK, bias_N)


def _rowmv(a_MK, w_NK, bias_N):
    y_MN = rowmv.grouped_rows_linear(a_MK, w_NK[None], torch.tensor([0, a_MK.shape[0]], dtype=torch.int64))
    return y_MN if bias_N is None else y_MN.add_(bias_N)


_KERNELS = {"onednn": _onednn, "torch": _torch, "rowmv": _rowmv}


def kernel_for(a_MK: torch.Tensor, w_NK: torch.Tensor, bias_N: torch.Tensor | None = None) -> str:
    """The kernel a · wᵀ (+ bias) runs on: "torch", "onednn" or "rowmv" (see the docstring)."""
    mode = settings.get().gemm
    onednn = _onednn_applies(a_MK, w_NK) and (bias_N is None or bias_N.dtype == a_MK.dtype)
    if mode == "torch" or not onednn:
        return "torch"
    if mode == "onednn":
        return "onednn"
    rows = a_MK.shape[0]
    rowmv_ok = _rowmv_applies(a_MK, w_NK)
    if not rowmv_ok and rows * w_NK.shape[0] * w_NK.shape[1] < MIN_MACS:
        return "torch"
    # the first is the rule (settings.tune="rules"): the mat-vec kernel for decode rows, else oneDNN
    names = (["rowmv"] if rowmv_ok else []) + ["onednn", "torch"]
    bucket = 1 << (rows - 1).bit_length()
    layout = "t" if a_MK.stride(-1) != 1 else "n"
    key = f"gemm {str(a_MK.dtype)[6:]} {bucket}x{w_NK.shape[0]}x{w_NK.shape[1]} {layout}"
    return tune.pick(key, {n: functools.partial(functools.partial, _KERNELS[n], a_MK, w_NK, bias_N) for n in names})


def linear(a_MK: torch.Tensor, w_NK: torch.Tensor, bias_N: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """a · wᵀ (+ bias): (M, K) × (N, K) -> (M, N), written into out when given."""
    kernel = kernel_for(a_MK, w_NK, bias_N)
    if kernel == "torch" and out is not None and bias_N is None:
        return torch.mm(a_MK, w_NK.t(), out=out)
    y_MN = _KERNELS[kernel](a_MK, w_NK, bias_N)
    return y_MN if out is None else out.copy_(y_MN)


def mm(a_MK: torch.Tensor, b_KN: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a · b: (M, K) × (K, N) -> (M, N)."""
    return linear(a_MK, b_KN.t(), out=out)


def addmm_(c_MN: torch.Tensor, a_MK: torch.Tensor, b_KN: torch.Tensor) -> torch.Tensor:
    """c += a · b in place."""
    if kernel_for(a_MK, b_KN.t()) == "onednn":
        return c_MN.add_(_onednn(a_MK, b_KN.t(), None))
    return c_MN.addmm_(a_MK, b_KN)


def onednn_mm(a_MK: torch.Tensor, b_KN: torch.Tensor) -> torch.Tensor:
    """a · b on oneDNN, no questions asked (for callers that chose it: moe/experts/cpu/)."""
    return _onednn(a_MK, b_KN.t(), None)

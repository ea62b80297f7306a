"""Matrix products on the fastest fp32 kernel torch ships for the CPU, with torch's own
as the reference and the fallback.

Why: torch's CPU mm/linear call MKL. On the project's reference machine (AMD EPYC with
AVX-512, 2 threads, torch 2.13) MKL's sgemm runs at ~180-195 GFLOP/s and its sgemv
(decode, one row) single-threaded at ~14 GB/s, while oneDNN, which torch also bundles
and reaches through `torch.ops.mkldnn._linear_pointwise`, runs the same fp32 products
at ~400-430 GFLOP/s and ~43 GB/s, with fp32 accumulation (no reduced-precision mode).
`python benchmarks/gemm.py` measures both on the machine at hand. Below ~1M
multiply-adds oneDNN's fixed cost per call (~14 µs vs MKL's ~5) loses, so small
products stay on torch.

Backend, chosen by name: "auto" (default: for 1-4 rows, the decode mat-vec kernel of
ops/rowmv.py; else oneDNN where it applies and the product is big enough), "onednn"
(oneDNN wherever it applies, any size), "torch" (torch's call always). Set it with
`set_backend`, the `backend` context manager, or the MOEKIT_GEMM environment variable.
oneDNN applies to CPU float32/bfloat16 2-D operands of any strides; it has no autograd
formula, so a call that autograd would need to differentiate stays on torch. moekit
calls these functions from its hand-written backward passes (experts, Linear) and
under no_grad.
"""

from __future__ import annotations

import contextlib
import os

import torch

from moekit.ops import ext, rowmv

BACKENDS = ("auto", "onednn", "torch")
MIN_MACS = 1 << 20  # below this many multiply-adds torch's MKL call is the quicker one
# oneDNN builds (JIT-compiles) a kernel for every new problem shape: measured, a
# 551x128 · 128x256 product takes 2.5 ms the first time and 0.2 ms after. An expert's
# row count changes every training step, so the expert bank pads each expert's rows
# with zero rows to a multiple of SHAPE_STEP (moe/experts/grouped.py): oneDNN then
# sees at most max_rows / SHAPE_STEP distinct sizes, each compiled once and cached.
# 32 rather than 64: less padding, still few shapes. Expert bank fwd+bwd with 4
# alternating routings (tiny: 2048 tokens, 8x128 experts; fine: 4096 tokens, 64x352):
# 9.4 vs 11.0 ms and 178 vs 197 ms; many (8192, 128x128): 46.3 vs 46.8 ms
SHAPE_STEP = 32
# The expert bank (ops/csrc/expert_bank.cpp) runs an expert's products on oneDNN's brgemm
# micro-kernel when its input weight (2F x D floats) fits in a core's L2 and neither
# side is wider than this; bigger experts go to oneDNN's matmul, which blocks for the
# caches itself. A/B on the fine layer (1024 x 704 weights, 2.8 MiB), micro-kernel
# against matmul: 1.14 of the forward's time, 1.18 of the forward+backward's.
MICRO_MAX_WEIGHT_BYTES = 1 << 20
MICRO_MAX_WIDTH = 1024
# up to this many rows (decode) and from this weight size, ops/rowmv.py's mat-vec kernel
ROWMV_MAX_ROWS = 4
ROWMV_MIN_WEIGHT = 1 << 16

try:
    _ONEDNN_LINEAR = torch.ops.mkldnn._linear_pointwise.default
except (AttributeError, RuntimeError):  # a build without oneDNN
    _ONEDNN_LINEAR = None
if not torch.backends.mkldnn.is_available():
    _ONEDNN_LINEAR = None
_DTYPES = (torch.float32, torch.bfloat16)


def _check(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"gemm backend={name!r} is not one of {', '.join(BACKENDS)}")
    return name


_backend = _check(os.environ.get("MOEKIT_GEMM", "auto"))


def set_backend(name: str) -> None:
    global _backend
    _backend = _check(name)


def get_backend() -> str:
    return _backend


def onednn_available() -> bool:
    return _ONEDNN_LINEAR is not None


@contextlib.contextmanager
def backend(name: str):
    """with gemm.backend("torch"): ... runs the block on the given backend."""
    old = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(old)


def bank_micro_kernel(d: int, n_in: int) -> bool:
    """Whether the expert bank runs the products of experts with a (n_in, d) input weight
    on oneDNN's brgemm micro-kernel ("auto" only: "onednn" keeps oneDNN's matmul)."""
    return (_backend == "auto" and n_in * d * 4 <= MICRO_MAX_WEIGHT_BYTES
            and max(d, n_in) <= MICRO_MAX_WIDTH)


def _rowmv_applies(a_MK: torch.Tensor, w_NK: torch.Tensor) -> bool:
    """auto, a few rows (decode) and a weight big enough that reading it is the cost."""
    return (_backend == "auto" and a_MK.dim() == 2 and w_NK.dim() == 2
            and 0 < a_MK.shape[0] <= ROWMV_MAX_ROWS and w_NK.numel() >= ROWMV_MIN_WEIGHT
            and rowmv.applies(a_MK, w_NK))


def _offsets(rows: int) -> torch.Tensor:
    return torch.tensor([0, rows], dtype=torch.int64)


def onednn_takes(x: torch.Tensor) -> bool:
    """Whether products on tensors like x can run on oneDNN (device, dtype, backend)."""
    return (_ONEDNN_LINEAR is not None and _backend != "torch" and x.device.type == "cpu"
            and x.dtype in _DTYPES)


def _onednn_applies(a_MK: torch.Tensor, w_NK: torch.Tensor) -> bool:
    if not onednn_takes(a_MK) or w_NK.dtype != a_MK.dtype:
        return False
    if a_MK.dim() != 2 or w_NK.dim() != 2 or a_MK.numel() == 0 or w_NK.numel() == 0:
        return False
    if torch.is_grad_enabled() and (a_MK.requires_grad or w_NK.requires_grad):
        return False  # no autograd formula: leave it to torch
    return _backend == "onednn" or a_MK.shape[0] * w_NK.shape[0] * w_NK.shape[1] >= MIN_MACS


def _row_major(a_MK: torch.Tensor) -> torch.Tensor:
    """a in contiguous rows, as oneDNN wants its left operand (it copies any other layout
    itself, with torch's copy_). A transposed view, as in a weight gradient dyᵀ · x, goes
    through csrc/transpose.cpp: 2048 x 128 in 0.05 ms vs copy_'s 0.13 at one thread
    (17 such copies in a `tiny` training step)."""
    if a_MK.stride(-1) == 1 or a_MK.stride(0) != 1 or a_MK.dtype != torch.float32 or not ext.available():
        return a_MK
    out_MK = a_MK.new_empty(a_MK.shape)
    ext.op("transpose_into")(a_MK.t(), out_MK)
    return out_MK


def linear(a_MK: torch.Tensor, w_NK: torch.Tensor, bias_N: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """a · wᵀ (+ bias): (M, K) × (N, K) -> (M, N), written into out when given."""
    if _rowmv_applies(a_MK, w_NK):
        y_MN = rowmv.grouped_rows_linear(a_MK, w_NK[None], _offsets(a_MK.shape[0]))
        if bias_N is not None:
            y_MN.add_(bias_N)
        return y_MN if out is None else out.copy_(y_MN)
    if _onednn_applies(a_MK, w_NK) and (bias_N is None or bias_N.dtype == a_MK.dtype):
        y_MN = _ONEDNN_LINEAR(_row_major(a_MK), w_NK, bias_N, "none", [], "")
        return y_MN if out is None else out.copy_(y_MN)
    if bias_N is not None:
        y_MN = torch.nn.functional.linear(a_MK, w_NK, bias_N)
        return y_MN if out is None else out.copy_(y_MN)
    if out is None:
        return torch.mm(a_MK, w_NK.t())
    return torch.mm(a_MK, w_NK.t(), out=out)


def mm(a_MK: torch.Tensor, b_KN: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a · b: (M, K) × (K, N) -> (M, N)."""
    return linear(a_MK, b_KN.t(), out=out)


def addmm_(c_MN: torch.Tensor, a_MK: torch.Tensor, b_KN: torch.Tensor) -> torch.Tensor:
    """c += a · b in place."""
    if _onednn_applies(a_MK, b_KN.t()):
        return c_MN.add_(_ONEDNN_LINEAR(_row_major(a_MK), b_KN.t(), None, "none", [], ""))
    return c_MN.addmm_(a_MK, b_KN)

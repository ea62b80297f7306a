"""Which CPU path runs a call of the expert bank: one frozen value, chosen by one function.

    path = choose(call)       # CpuPath(kernel="whole", products="micro", combine="slots", ...)

The paths, which runs when (every one computes y = Σ_r w_r · expert_e(r)(x_t(r)); the
chunk loop is the reference the others are tested against):

| kernel  | forward                                   | runs when                                                     |
|---------|-------------------------------------------|---------------------------------------------------------------|
| decode  | grouped row mat-vec, both projections     | no gradient, fp32, kernels built, every expert ≤ 4 rows       |
| rows    | threads own tokens; packed weights        | no gradient, fp32 SwiGLU, AVX-512 build, D, F % 16 == 0,      |
|         | (cpu/packed.py, made by prepare)          | D ≤ 1024, weights packed by `prepare_for_inference`           |
| columns | threads own tokens, activations in        | fp32 SwiGLU, AVX-512 build, experts fit the micro-kernel,     |
|         | columns (backward: whole)                 | D % 16 == 0, ≥ 2 experts per thread per chunk                 |
| whole   | whole experts per thread (C++), fwd+bwd   | fp32 SwiGLU, kernels built, ≥ 2 experts per thread per chunk  |
| chunked | Python loop over chunks of sorted rows,   | everything else (other dtypes and activations, few experts    |
|         | products on ops.gemm                      | per thread, kernels off)                                      |

Inside a path, `products` names the GEMM engine: for whole (and the backward of
columns) one of "micro" (oneDNN's brgemm, experts whose input weight fits a core's L2),
"matmul" (oneDNN's matmul, where the CPU has the instructions torch asks of it: probed
once) and "blas" (torch's BLAS call); for chunked "onednn" or "torch" (ops/gemm.py).
When more than one engine applies, the fastest for the expert's shape on this machine
wins (timed once per machine and shape class, ops/tune.py; under settings.tune="rules"
the first in the order micro, matmul, blas). `combine` says how whole's output rows
become y: "slots" (each row to its slot t·K + k of one buffer, summed per token) while
that buffer is at most SLOT_MAX_BYTES, else "scatter" (a scatter-add per chunk).

The value is visible: the bank keeps the last one in `state.last_path`, and
settings.cpu_path overrides fields of it (benchmarks/ab.py compares paths that way);
tests pass CpuPath values straight to `cpu_experts`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch

from moekit import settings
from moekit.ops import expert_bank as bank_ops
from moekit.ops import ext, gemm, tune

KERNELS = ("decode", "rows", "columns", "whole", "chunked")
PRODUCTS = ("micro", "matmul", "blas", "onednn", "torch")
COMBINES = ("slots", "scatter")

# a decode step: up to this many rows per expert the mat-vec kernel reads each expert's
# weights once for all its rows (it matched or beat per-expert GEMMs up to 4 rows)
DECODE_MAX_ROWS = 4
# chunked: rows per chunk from the widest buffer's size, at least MIN_ROWS (every chunk
# re-reads its experts' weights; coarse fwd+bwd ran 8% faster than with 186-row chunks),
# never a buffer past glibc's 32 MiB mmap threshold (fresh pages would fault in every call)
CHUNK_BYTES, MIN_ROWS, MAX_BUFFER_BYTES = 4 * 2**20, 1024, 30 * 2**20
# whole: rows per kernel call from the widest row buffer's size (bounds the threads'
# buffers and the blocks of saved pre-activations)
WHOLE_CHUNK_BYTES = 8 * 2**20
# whole needs this many experts per thread in a chunk, else threads idle: coarse (8
# experts of ~1024 rows) took 1.68x the forward and 1.42x the forward+backward of chunked
MIN_EXPERTS_PER_THREAD = 2
# the largest (T·K, D) slot buffer the combine sums from; from STREAM_MIN_BYTES up it is
# written with non-temporal stores (it outgrows the caches before the sum reads it back)
SLOT_MAX_BYTES, STREAM_MIN_BYTES = 256 * 2**20, 16 * 2**20
# the micro-kernel takes experts whose input weight (N x D floats) fits a core's L2
MICRO_MAX_WEIGHT_BYTES, MICRO_MAX_WIDTH = 1 << 20, 1024
# rows: each piece holds ≤ 384 KiB of x rows and streams its expert's weights again, so
# wider models turn memory-bound (D = 2048, E = 64, k = 8, F = 704: 1.119x the time of
# the other paths, `python benchmarks/ab.py --override kernel=rows --config ...`)
ROWS_MAX_D = 1024


@dataclass(frozen=True)
class CpuPath:
    kernel: str = "chunked"
    products: str = "torch"
    combine: str = "scatter"
    chunk_rows: int = MIN_ROWS
    pad: int = 1  # rows of each expert padded with zero rows to a multiple of this (1: none)
    stream: bool = False  # non-temporal writes of the slot buffer

    def __post_init__(self) -> None:
        for name, valid in (("kernel", KERNELS), ("products", PRODUCTS), ("combine", COMBINES)):
            if getattr(self, name) not in valid:
                raise ValueError(f"CpuPath.{name}={getattr(self, name)!r} is not one of {', '.join(valid)}")
        if self.kernel in ("whole", "columns") and self.products not in ("micro", "matmul", "blas"):
            raise ValueError(f"CpuPath: kernel {self.kernel!r} runs products on micro, matmul or blas, "
                             f"not {self.products!r}")
        if self.kernel == "chunked" and self.products not in ("onednn", "torch"):
            raise ValueError(f"CpuPath: kernel 'chunked' runs products on onednn or torch, not {self.products!r}")
        for name in ("chunk_rows", "pad"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"CpuPath.{name}={getattr(self, name)!r} must be an integer >= 1")


def check_overrides(fields: dict) -> None:
    """settings.cpu_path: known field names (the values are checked when applied)."""
    names = {f.name for f in dataclasses.fields(CpuPath)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(f"moekit settings: cpu_path has unknown field(s) {unknown}; valid: {sorted(names)}")


@dataclass(frozen=True)
class Call:
    """What the choice depends on: one call's shapes, dtype and needs."""

    T: int
    D: int
    F: int
    K: int  # slots per token (0: the plan does not say)
    counts: tuple[int, ...]
    dtype: torch.dtype
    act: str
    grad: bool  # the forward must save what a backward needs
    contiguous: bool  # both weights contiguous
    packed: bool  # packed weights are prepared (the rows kernel)

    @property
    def N(self) -> int:
        return 2 * self.F if self.act in ("swiglu", "geglu") else self.F


def choose(call: Call) -> CpuPath:
    """The path for this call, with settings.cpu_path's overrides applied."""
    path = _choose(call)
    overrides = settings.get().cpu_path
    return dataclasses.replace(path, **overrides) if overrides else path


def _choose(call: Call) -> CpuPath:
    kernels = ext.available()
    fp32 = call.dtype == torch.float32
    if kernels and fp32 and not call.grad and max(call.counts, default=0) <= DECODE_MAX_ROWS:
        return CpuPath(kernel="decode", products="torch")
    if not (kernels and fp32 and call.act == "swiglu" and call.contiguous):
        return chunked(call)
    owned = ext.caps().avx512 and call.D % 16 == 0
    if owned and call.packed and not call.grad and call.F % 16 == 0 and call.D <= ROWS_MAX_D:
        return CpuPath(kernel="rows", products="micro")
    rows = whole_chunk_rows(call)
    if not enough_experts(call.counts, rows):
        return chunked(call)
    products = bank_engine(call)
    slot_bytes = call.T * call.K * call.D * 4
    combine = "slots" if 0 < slot_bytes <= SLOT_MAX_BYTES else "scatter"
    kernel = "columns" if owned and products == "micro" else "whole"
    return CpuPath(kernel=kernel, products=products, combine=combine, chunk_rows=rows, pad=gemm.SHAPE_STEP,
                   stream=combine == "slots" and slot_bytes >= STREAM_MIN_BYTES)


def chunked(call: Call) -> CpuPath:
    """The chunk loop, its products on oneDNN (padded rows) or torch, whichever is faster
    for this expert shape on this machine (oneDNN first under rules)."""
    rows = chunk_rows(call.dtype, call.N, call.D)
    names = (["onednn"] if gemm.onednn_takes(torch.empty(0, dtype=call.dtype)) else []) + ["torch"]
    products = tune.pick(f"chunked {str(call.dtype)[6:]} {call.act} {call.D}x{call.F} rows{_median_bucket(call)}",
                         {n: functools.partial(_chunked_probe, n, call, rows) for n in names})
    return CpuPath(kernel="chunked", products=products, chunk_rows=rows,
                   pad=gemm.SHAPE_STEP if products == "onednn" else 1)


def _chunked_probe(products: str, call: Call, rows: int):
    from moekit.moe.experts.activations import ACTIVATIONS
    from moekit.moe.experts.cpu.chunked import forward_probe

    return forward_probe(products, call.dtype, ACTIVATIONS.get(call.act), call.D, call.F,
                         _median_rows(call), gemm.SHAPE_STEP, rows)


def _median_rows(call: Call) -> int:
    busy = sorted(c for c in call.counts if c)
    return busy[len(busy) // 2] if busy else 1


def _median_bucket(call: Call) -> int:
    """The median expert's rows rounded up to a power of two: the shape class timed."""
    return 1 << (_median_rows(call) - 1).bit_length()


def chunk_rows(dtype: torch.dtype, n_in: int, d: int) -> int:
    row_bytes = torch.empty(0, dtype=dtype).element_size() * max(n_in, d)
    rows = max(MIN_ROWS, CHUNK_BYTES // row_bytes)
    rows = max(1, min(rows, MAX_BUFFER_BYTES // row_bytes))
    return rows - rows % gemm.SHAPE_STEP if rows > gemm.SHAPE_STEP else rows


def whole_chunk_rows(call: Call) -> int:
    return max(MIN_ROWS, WHOLE_CHUNK_BYTES // (4 * max(call.N, call.D)))


def enough_experts(counts: tuple[int, ...], rows: int) -> bool:
    """Whether a chunk of `rows` rows holds, on average, MIN_EXPERTS_PER_THREAD experts
    per thread (with fewer, splitting each product between the threads is faster)."""
    busy = [c for c in counts if c]
    if not busy:
        return False
    per_chunk = min(len(busy), rows * len(busy) / sum(busy))
    return per_chunk >= MIN_EXPERTS_PER_THREAD * torch.get_num_threads()


def bank_engine(call: Call) -> str:
    """The fastest product engine for whole's experts on this machine (see the docstring)."""
    names = [n for n in ("micro", "matmul", "blas") if _engine_applies(n, call)]
    return tune.pick(f"bank {call.D}x{call.F} rows{_median_bucket(call)}",
                     {n: functools.partial(bank_ops.forward_probe, n, call.D, call.F, _median_rows(call))
                      for n in names})


def _engine_applies(engine: str, call: Call) -> bool:
    if engine == "micro":
        return (call.N * call.D * 4 <= MICRO_MAX_WEIGHT_BYTES and max(call.D, call.N) <= MICRO_MAX_WIDTH
                and settings.get().gemm != "torch")
    if engine == "matmul":
        return bank_ops.matmul_works() and settings.get().gemm != "torch"
    return True

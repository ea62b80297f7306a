"""torch's CPU GEMM (MKL) against oneDNN, the two kernels ops/gemm.py chooses between.

    python benchmarks/gemm.py [--threads 2]

For the products an MoE layer and an LM run (expert GEMMs of the benchmark configs at
a few row counts, their backward forms, decode rows, an LM head), it prints GFLOP/s of
torch.mm (the nn.Linear path), of oneDNN through torch.ops.mkldnn._linear_pointwise,
and of what ops.gemm picks under "auto", plus the max relative error of each against
fp64. Interleaved, median of 5 rounds, one process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moekit.ops import gemm

# (label, M, N, K, form): form "nt" = a · wᵀ (forward), "nn" = dy · w (dx), "tn" = dyᵀ · x (dw)
CASES = [
    ("fine w_in fwd, 256 rows", 256, 704, 1024, "nt"),
    ("fine w_out fwd, 256 rows", 256, 1024, 352, "nt"),
    ("fine w_in dx, 256 rows", 256, 1024, 704, "nn"),
    ("fine w_in dw, 256 rows", 704, 1024, 256, "tn"),
    ("many w_in fwd, 256 rows", 256, 256, 512, "nt"),
    ("many w_out fwd, 256 rows", 256, 512, 128, "nt"),
    ("coarse w_in fwd, 1024 rows", 1024, 5632, 1024, "nt"),
    ("coarse w_out dw, 1024 rows", 1024, 2816, 1024, "tn"),
    ("decode coarse w_in, 1 row", 1, 5632, 1024, "nt"),
    ("decode fine w_in, 1 row", 1, 704, 1024, "nt"),
    ("decode LM head 32000x512, 1 row", 1, 32000, 512, "nt"),
    ("decode LM head 32000x512, 8 rows", 8, 32000, 512, "nt"),
]


def operands(M, N, K, form, g):
    if form == "nt":
        return torch.randn(M, K, generator=g), torch.randn(N, K, generator=g).t()
    if form == "nn":
        return torch.randn(M, K, generator=g), torch.randn(K, N, generator=g)
    return torch.randn(K, M, generator=g).t(), torch.randn(K, N, generator=g)


def timed(f, rounds: int = 5) -> float:
    f()
    t0 = time.perf_counter()
    f()
    reps = max(1, min(200, int(0.05 / max(time.perf_counter() - t0, 1e-6))))
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        out.append((time.perf_counter() - t0) / reps)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not gemm.onednn_available():
        raise SystemExit("this torch build has no oneDNN: ops.gemm always uses torch's kernel")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32; GFLOP/s "
          f"(max relative error vs fp64); auto = what ops.gemm picks, and its GFLOP/s")
    print(f"{'product':34s} {'M':>5s} {'N':>6s} {'K':>5s}  {'torch':>13s}  {'oneDNN':>13s}  "
          f"{'auto':>13s}  oneDNN/torch")
    g = torch.Generator().manual_seed(0)
    for label, M, N, K, form in CASES:
        a, b = operands(M, N, K, form, g)
        ref = a.double() @ b.double()
        cells, secs = [], {}
        for name in ("torch", "onednn"):
            with gemm.backend(name):
                y = gemm.mm(a, b)
                secs[name] = timed(lambda: gemm.mm(a, b))  # noqa: B023
            err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
            cells.append(f"{2 * M * N * K / secs[name] / 1e9:6.1f} ({err:.0e})")
        with torch.no_grad(), gemm.backend("auto"):
            bt = b.t()
            pick = ("rowmv" if gemm._rowmv_applies(a, bt) else
                    "oneDNN" if gemm._onednn_applies(a, bt) else "torch")
            secs["auto"] = timed(lambda: gemm.mm(a, b))  # noqa: B023
        print(f"{label:34s} {M:5d} {N:6d} {K:5d}  {cells[0]:>13s}  {cells[1]:>13s}  {pick:>6s} "
              f"{2 * M * N * K / secs['auto'] / 1e9:6.1f}  {secs['torch'] / secs['onednn']:5.2f}x")


if __name__ == "__main__":
    main()

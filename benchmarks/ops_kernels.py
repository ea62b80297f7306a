"""moekit's C++ kernels (ops/topk.py, ops/swiglu.py, ops/attention.py, ops/rmsnorm.py, ops/route.py,
ops/sort.py, ops/gemm.py's transpose) and ops/softmax.py against the torch calls they replace,
on the shapes of benchmarks/layer.py's configs and the tiny preset, in one process.

    python benchmarks/kernels.py [--threads 2]

Each cell is the median of 50 calls on warm (cache-hot) operands, so it isolates the
kernels; benchmarks/ab.py measures them inside the layer.
  top-k   router scores (T, E), k ids per row: the kernel vs torch.topk
  swiglu  one expert's m x F activations (routing weights applied): forward =
          silu(g)·u·w, backward = dh, a·w and <u_bar, a> together; the kernel vs the
          torch ops moekit ran before it (3 and 8 passes)
  attention  RoPE + causal attention of (B, heads, S, d) q, k, v (GQA where kv heads < heads),
          forward (no grad) and forward+backward: the kernel vs its reference, RoPE + SDPA
          (the kernel is called directly, also past ops/attention.py's MAX_LEN: the last
          shape shows why it stops there)
  small   fwd+bwd (or fwd) of the row kernels, each against its reference: RMSNorm
          (F.rms_norm), softmax routing (softmax, gather, renormalise, logsumexp), the
          short-row softmax (torch.softmax), the counting sort of slots by expert (the
          tensor sort) and the transpose oneDNN's left operand gets (torch's copy_)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moekit.models.rope import RotaryEmbedding
from moekit.ops import attention, ext, gemm, rmsnorm, route, softmax, swiglu, topk
from moekit.ops import rows as row_ops
from moekit.ops import sort as sort_ops


def median_us(fn, n: int = 50) -> float:
    for _ in range(3):
        fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def bench_topk() -> None:
    print(f"{'top-k (T, E, k)':24s}{'kernel us':>11s}{'torch us':>10s}{'speed-up':>10s}")
    for T, E, k in [(8192, 128, 4), (4096, 64, 8), (4096, 8, 2), (2048, 8, 2), (1, 64, 8)]:
        x = torch.randn(T, E)
        a = median_us(lambda x=x, k=k: topk.topk_ids(x, k))
        b = median_us(lambda x=x, k=k: torch.topk(x, k, dim=-1))
        print(f"{str((T, E, k)):24s}{a:11.1f}{b:10.1f}{b / a:9.2f}x")


def torch_swiglu_fwd(h, w, a, F):
    s = torch.ops.aten.silu.out(h[:, :F], out=a)
    torch.mul(s, h[:, F:], out=a)
    a.mul_(w[:, None])


def torch_swiglu_bwd(h, ub, w, dh, a, s, tmp, F):
    torch.ops.aten.silu.out(h[:, :F], out=s)
    torch.mul(s, h[:, F:], out=a)
    torch.linalg.vecdot(ub, a)
    a.mul_(w[:, None])
    u = ub * w[:, None]
    torch.mul(u, s, out=dh[:, F:])
    torch.mul(u, h[:, F:], out=tmp)
    torch.ops.aten.silu_backward.grad_input(tmp, h[:, :F], grad_input=dh[:, :F])


def swiglu_row(m: int, F: int) -> str:
    h, w, ub = torch.randn(m, 2 * F), torch.rand(m), torch.randn(m, F)
    a, dh, s, tmp = torch.empty(m, F), torch.empty(m, 2 * F), torch.empty(m, F), torch.empty(m, F)
    kf = median_us(lambda: swiglu.forward(h, w, a))
    tf = median_us(lambda: torch_swiglu_fwd(h, w, a, F))
    kb = median_us(lambda: swiglu.backward(h, ub, w, dh, a, True))
    tb = median_us(lambda: torch_swiglu_bwd(h, ub, w, dh, a, s, tmp, F))
    return f"{str((m, F)):24s}{kf:11.1f}{tf:10.1f}{kb:11.1f}{tb:10.1f}"


def bench_swiglu() -> None:
    print(f"\n{'swiglu (m, F)':24s}{'fwd kernel':>11s}{'fwd torch':>10s}{'bwd kernel':>11s}{'bwd torch':>10s}  (us)")
    for m, F in [(512, 352), (256, 128), (544, 128), (1024, 2816)]:
        print(swiglu_row(m, F))


def attention_row(B: int, H: int, G: int, S: int, d: int) -> str:
    rope = RotaryEmbedding(d, S, 10000.0)(0, S)
    tables = (rope.cos_SH, rope.sin_SH)
    q = torch.randn(B, S, H, d).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(B, S, G, d).transpose(1, 2).requires_grad_() for _ in range(2))
    do = torch.randn(B, H, S, d)

    def fwd(fn):
        with torch.no_grad():
            fn(q, k, v, *tables)

    def fb(fn):
        torch.autograd.grad(fn(q, k, v, *tables), (q, k, v), do)
    cells = [median_us(lambda f=f, fn=fn: f(fn), n=10) / 1e3 for f in (fwd, fb)
             for fn in (attention.kernel, attention.reference)]
    return f"{str((B, H, G, S, d)):24s}" + "".join(f"{c:10.2f}" for c in cells)


def bench_attention() -> None:
    print(f"\n{'attention (B,H,G,S,d)':24s}{'fwd kern':>10s}{'fwd ref':>10s}{'fb kern':>10s}{'fb ref':>10s}  (ms)")
    for shape in [(16, 4, 4, 128, 32), (8, 8, 2, 256, 64), (4, 8, 8, 512, 64), (2, 8, 8, 1024, 128)]:
        print(attention_row(*shape))


def _fb(fn, x, *rest):
    """forward and backward of fn(x, *rest) with a ones-like gradient per output"""
    def run():
        outs = fn(x, *rest)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        x.grad = None
    return run


def bench_small() -> None:
    print(f"\n{'small kernels':44s}{'kernel us':>10s}{'torch us':>10s}{'speed-up':>10s}")
    rows = []
    for shape in [(16, 128, 128), (4, 1024, 1024)]:
        x, w = torch.randn(*shape, requires_grad=True), torch.randn(shape[-1], requires_grad=True)
        rows.append((f"rmsnorm fwd+bwd {shape}", _fb(rmsnorm.rms_norm, x, w, 1e-5), _fb(rmsnorm.reference, x, w, 1e-5)))
    for T, E, K in [(2048, 8, 2), (4096, 64, 8), (8192, 128, 4)]:
        x = torch.randn(T, E, requires_grad=True)
        ids = topk.topk_ids(x.detach(), K)
        rows.append((f"route softmax fwd+bwd ({T}, {E}, k={K})", _fb(route.route_softmax, x, ids, True),
                     _fb(route.reference, x, ids, True)))
    for T, E in [(2048, 8), (4096, 64)]:
        x = torch.randn(T, E, requires_grad=True)
        rows.append((f"short softmax fwd+bwd ({T}, {E})", _fb(softmax.softmax, x),
                     _fb(lambda t: torch.softmax(t, -1), x)))
    for T, K, E in [(2048, 2, 8), (8192, 4, 128)]:
        ids = torch.randint(0, E, (T, K))
        rows.append((f"sort slots ({T}, k={K}, E={E})", lambda ids=ids, E=E: sort_ops._sort_by_counting(ids, E),
                     lambda ids=ids, E=E: sort_ops._sort_with_tensors(ids, E)))
    for T, K, D in [(2048, 2, 128), (4096, 8, 128)]:
        src = torch.randn(T * K, D)
        rows.append((f"sum slots ({T}, k={K}, {D})", lambda s=src, K=K: row_ops.sum_slots(s, K),
                     lambda s=src, K=K: row_ops.sum_slots_reference(s, K)))
    for M, N in [(2048, 128), (4096, 1024)]:
        a = torch.randn(M, N).t()
        rows.append((f"transpose ({N}, {M}) view -> rows", lambda a=a: gemm._row_major(a), lambda a=a: a.contiguous()))
    for name, kern, ref in rows:
        k_us, r_us = median_us(kern), median_us(ref)
        print(f"{name:44s}{k_us:10.1f}{r_us:10.1f}{r_us / k_us:9.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if not ext.available():
        raise SystemExit("the C++ kernels did not build here (see the warning above)")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, fp32")
    bench_topk()
    bench_swiglu()
    bench_attention()
    bench_small()


if __name__ == "__main__":
    main()

"""One moekit layer with a switch off (A) and on (B), alternating in ONE process.

    python benchmarks/ab.py --config many --mode fb --switch pool --rounds 10

Each round times A then B, the next round B then A (ABBA), so drift in machine load
and order effects hit both; it prints the median times and the median of the per-round
ratios B/A (below 1: the switch helps). The layers are benchmarks/layer.py's moekit
layers (fwd = inference forward under no_grad; fb = forward + backward, gradients set
to None before each call, as a training loop with zero_grad(set_to_none=True) does);
step = 5 whole training steps of the `tiny` preset (then --config plays no part).

Switches (off -> on):
  pool     ops/grad_pool.py (MOEKIT_GRAD_POOL=0 -> 1)
  kernels  every C++ kernel of ops/ext.py (the torch references -> the kernels)
  topk     the router top-k kernel only (torch.topk -> ops/topk.py)
  swiglu   the fused SwiGLU only (torch ops -> ops/swiglu.py)
  rows     the row scatter-add only (index_add_ -> ops/rows.py)
  byexpert whole experts per thread (grouped.py's chunk loop -> moe/experts/by_expert.py)
  micro    the expert bank's products on oneDNN's matmul -> on its brgemm micro-kernel
  stream   the bank's slot-buffer rows written with plain -> non-temporal stores
  onecall  the bank's kernels called once per chunk -> once over all chunks
  columns  the inference forward of micro-kernel experts: whole experts per thread and
           summed slots -> threads owning tokens, in columns (ops/csrc/expert_bank_cols.cpp)
  packed   that forward in columns -> in rows on packed weights (ops/csrc/expert_bank_rows.cpp)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import layer as L  # noqa: E402  (benchmarks/layer.py: configs and the moekit layer)

from moekit.moe.experts import by_expert, grouped  # noqa: E402
from moekit.ops import ext, gemm, rows, topk  # noqa: E402
from moekit.training.heap import keep_freed_memory  # noqa: E402

_fused, _topk_applies, _rows_applies = grouped._fused_swiglu, topk.applies, rows.applies
_micro_applies = gemm.bank_micro_kernel
_stream_min = by_expert.STREAM_MIN_BYTES


def _pool(on: bool) -> None:
    os.environ["MOEKIT_GRAD_POOL"] = "1" if on else "0"


def _kernels(on: bool) -> None:
    ext.available()  # build once, then toggle
    ext._state["built"] = on


def _topk(on: bool) -> None:
    topk.applies = _topk_applies if on else (lambda *a: False)


def _swiglu(on: bool) -> None:
    grouped._fused_swiglu = _fused if on else (lambda *a: False)


def _rows(on: bool) -> None:
    rows.applies = _rows_applies if on else (lambda *a: False)


def _byexpert(on: bool) -> None:
    by_expert.ENABLED = on


def _micro(on: bool) -> None:
    gemm.bank_micro_kernel = _micro_applies if on else (lambda *a: False)


def _stream(on: bool) -> None:
    by_expert.STREAM_MIN_BYTES = _stream_min if on else 2**62


def _onecall(on: bool) -> None:
    by_expert.ONE_CALL = on


def _columns(on: bool) -> None:
    by_expert.COLUMNS = on


def _packed(on: bool) -> None:
    by_expert.ROWS = on


SWITCHES = {"pool": _pool, "kernels": _kernels, "topk": _topk, "swiglu": _swiglu, "rows": _rows,
            "byexpert": _byexpert, "micro": _micro, "stream": _stream, "onecall": _onecall, "columns": _columns,
            "packed": _packed}


def _train_step(steps: int = 5):
    """`steps` whole training steps of the `tiny` preset (fresh batches of 16 x 128 bytes,
    AdamW), after 100 warm-up steps (oneDNN's kernel compiles, benchmarks/train.py)."""
    from moekit.models import MoELM, get_preset

    torch.manual_seed(0)
    model = MoELM(get_preset("tiny", 260)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    gen = torch.Generator().manual_seed(1)

    def step() -> None:
        ids = torch.randint(0, 256, (16, 128), generator=gen)
        targets = torch.roll(ids, -1, 1)
        targets[:, -1] = -100
        out = model(ids, targets_BS=targets)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def run() -> None:
        for _ in range(steps):
            step()

    for _ in range(100 // steps):
        run()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", default="fb", choices=["fwd", "fb", "step"])
    ap.add_argument("--switch", default="pool", choices=list(SWITCHES))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu = process CPU time: robust on a busy machine, but only with --threads 1")
    a, s = L.parse_with_config(ap, "many", list(L.CONFIGS))
    keep_freed_memory()  # as benchmarks/layer.py and a training run do
    layer = L.MoekitLayer(s).layer
    x = torch.randn(s.T // L.SEQ, L.SEQ, s.d)
    dy = torch.randn_like(x)
    xg = x.clone().requires_grad_()

    def fb() -> None:
        for p in layer.parameters():
            p.grad = None
        layer(xg).y.backward(dy)

    def fwd() -> None:
        with torch.no_grad():
            layer(x)

    run, switch = {"fb": fb, "fwd": fwd, "step": _train_step()}[a.mode], SWITCHES[a.switch]
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    times: dict[bool, list[float]] = {False: [], True: []}
    for on in (False, True):  # warm-up of both settings
        switch(on)
        run()
        run()
    for i in range(a.rounds):
        for on in ((False, True) if i % 2 == 0 else (True, False)):
            switch(on)
            t0 = clock()
            run()
            times[on].append(clock() - t0)
    ratios = [b / o for o, b in zip(times[False], times[True], strict=True)]
    print(f"{a.config} {a.mode} switch={a.switch}: A (off) {statistics.median(times[False]) * 1e3:.1f} ms, "
          f"B (on) {statistics.median(times[True]) * 1e3:.1f} ms, B/A median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {a.rounds} rounds, threads {a.threads})")


if __name__ == "__main__":
    main()

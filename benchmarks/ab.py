"""One moekit layer under two settings A and B, alternating in ONE process.

    python benchmarks/ab.py --config many --mode fb --a kernel=chunked,products=torch --b kernel=whole
    python benchmarks/ab.py --mode step --a grad_pool=false --b grad_pool=true

Each side is a comma-separated list of field=value: fields of moekit.settings.Settings
(kernels, gemm, tune, attention_kernel, grad_pool) set those; fields of the CPU expert
path (moe/experts/cpu/path.py: CpuPath: kernel, products, combine, chunk_rows, pad,
stream) override what the layer would choose, through settings.cpu_path. An empty side
is the defaults. The script prints the path each side's layer took.

Each round times A then B, the next round B then A (ABBA), so drift in machine load
and order effects hit both; it prints the median times and the median of the per-round
ratios B/A (below 1: B is faster). The layers are benchmarks/layer.py's moekit layers
(fwd = inference forward under no_grad; fb = forward + backward, gradients set to None
before each call, as a training loop with zero_grad(set_to_none=True) does); step = 5
whole training steps of the `tiny` preset (then --config plays no part).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import layer as L  # noqa: E402  (benchmarks/layer.py: configs and the moekit layer)

from moekit import settings  # noqa: E402
from moekit.moe.experts.cpu import CpuPath  # noqa: E402
from moekit.training.heap import keep_freed_memory  # noqa: E402

SETTINGS_FIELDS = {f.name for f in dataclasses.fields(settings.Settings)} - {"cpu_path"}
PATH_FIELDS = {f.name for f in dataclasses.fields(CpuPath)}


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        return text


def side(spec: str) -> dict:
    """'kernel=whole,grad_pool=false' -> the settings.use(...) arguments for that side."""
    out: dict = {}
    path: dict = {}
    for item in filter(None, spec.split(",")):
        name, _, value = item.partition("=")
        if name in SETTINGS_FIELDS:
            out[name] = _value(value)
        elif name in PATH_FIELDS:
            path[name] = _value(value)
        else:
            raise SystemExit(f"ab.py: unknown field {name!r}; settings: {sorted(SETTINGS_FIELDS)}, "
                             f"CPU path: {sorted(PATH_FIELDS)}")
    if path:
        out["cpu_path"] = path
    return out


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
    ap.add_argument("--a", default="", help="side A: field=value,... (see the docstring)")
    ap.add_argument("--b", default="", help="side B: field=value,...")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="cpu = process CPU time: robust on a busy machine, but only with --threads 1")
    a, s = L.parse_with_config(ap, "many", list(L.CONFIGS))
    keep_freed_memory()  # as benchmarks/layer.py and a training run do
    sides = {"A": side(a.a), "B": side(a.b)}
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

    run = {"fb": fb, "fwd": fwd, "step": _train_step()}[a.mode]
    clock = time.process_time if a.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {"A": [], "B": []}
    for name, kw in sides.items():  # warm-up of both sides
        with settings.use(**kw):
            run()
            run()
        print(f"{name}: {kw or 'defaults'} -> {layer.experts.cpu_state.last_path}")
    for i in range(a.rounds):
        for name in (("A", "B") if i % 2 == 0 else ("B", "A")):
            with settings.use(**sides[name]):
                t0 = clock()
                run()
                times[name].append(clock() - t0)
    ratios = [b / o for o, b in zip(times["A"], times["B"], strict=True)]
    print(f"{a.config} {a.mode}: A {statistics.median(times['A']) * 1e3:.1f} ms, "
          f"B {statistics.median(times['B']) * 1e3:.1f} ms, B/A median {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {a.rounds} rounds, threads {a.threads})")


if __name__ == "__main__":
    main()

"""Where the time of one layer call goes, by op, for moekit and the dense limit.

    python benchmarks/profile_layer.py [--config many] [--mode fwd|fb] [--calls 3] [--top 12]

Runs benchmarks/layer.py's `dense-gemm` and `moekit` modules of a config under
torch.profiler (CPU) and prints, per call: the time of all ops, the time in the GEMM
kernel (oneDNN's `mkldnn::_linear_pointwise`, which both use), the rest, and moekit's
most expensive ops. Profiler times are per-op self times (a little inflated for small
ops); use it to see the split, and benchmarks/layer.py or ab.py for speed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
import layer as L  # noqa: E402

GEMM = "mkldnn::_linear_pointwise"


def profiled(step, calls: int):
    for _ in range(2):  # warm-up: kernels built, oneDNN shapes compiled
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step()
    return prof.key_averages()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", default="fwd", choices=["fwd", "fb"])
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--top", type=int, default=12)
    a, s = L.parse_with_config(ap, "many", ["coarse", "fine", "many"])
    mods = L.build_all(s, ["none"])
    x = torch.randn(s.T // L.SEQ, L.SEQ, s.d)
    dy = torch.randn_like(x) * s.d ** -0.5 if a.mode == "fb" else None
    if dy is not None:
        x.requires_grad_(True)
    print(f"{a.config} {a.mode}, threads {a.threads}, {a.calls} calls; ms per call (profiler self times)")
    for name in ("dense-gemm", "moekit"):
        events = profiled(L.make_step(mods[name], x, dy), a.calls)
        total = sum(e.self_cpu_time_total for e in events) / a.calls / 1e3
        gemm = sum(e.self_cpu_time_total for e in events if e.key == GEMM) / a.calls / 1e3
        print(f"{name:11s} all ops {total:7.1f}   GEMMs {gemm:7.1f}   rest {total - gemm:7.1f}")
        if name == "moekit":
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: a.top]:
                print(f"    {e.key[:48]:48s} {e.self_cpu_time_total / a.calls / 1e3:7.2f}  ({e.count // a.calls} calls)")


if __name__ == "__main__":
    main()

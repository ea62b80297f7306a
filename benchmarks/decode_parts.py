"""Where a decode step of moekit's layer spends its time: router, dispatch, routed
experts, shared expert, and the whole layer, for one token.

    python benchmarks/decode_parts.py [--config fine|coarse] [--rounds 30]

As in benchmarks/layer.py's decode timing, every timed call follows, untimed, a whole
step of a second layer of the same shape with other weights (a model's other layer),
so code is warm and the timed layer's weights are out of cache. Medians in µs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import layer as L  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="fine", choices=["coarse", "fine"])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    s = L.CONFIGS[a.config]
    lay = L.build_all(s, ["none"])["moekit"].layer.eval()
    other = L.build_all(s, ["none"], seed=1)["moekit"].layer.eval()
    x = torch.randn(1, s.d)
    with torch.no_grad():
        routing = lay.router(x)
        plan = lay.dispatch(routing, lay.cfg)
        parts = {"whole layer": lambda: lay(x), "router": lambda: lay.router(x),
                 "dispatch": lambda: lay.dispatch(routing, lay.cfg), "routed experts": lambda: lay.experts(x, plan)}
        if lay.shared is not None:
            parts["shared expert"] = lambda: lay.shared(x)
        times: dict[str, list[float]] = {k: [] for k in parts}
        for _ in range(a.rounds):
            for k, f in parts.items():
                other(x)
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
    print(f"{a.config}, T = 1, threads {a.threads}, median of {a.rounds}")
    for k, v in times.items():
        print(f"{k:16s}{statistics.median(v) * 1e6:8.0f} us")


if __name__ == "__main__":
    main()

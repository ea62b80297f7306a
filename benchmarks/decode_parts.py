"""Where a decode step of moekit's layer spends its time, for one token: the whole layer
(one kernel call: moe/decode_step.py), the same stage by stage (router, dispatch, then
experts + shared expert in one kernel: moe/experts/decode.py fused_step), each stage
alone, the experts through the unfused modules, and a plain sum() over the weights the
step reads.

    python benchmarks/decode_parts.py [--config fine|coarse] [--tokens 1] [--rounds 60]

Harness of benchmarks/layer.py's decode timing: every timed call follows, untimed, the
same call on a second layer of the same shape with other weights (a model's other
layer), so code is warm and the timed layer's weights are out of cache; the order of
the parts rotates each round. Medians in µs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import layer as L  # noqa: E402

from moekit.moe.experts import decode  # noqa: E402


def parts_of(lay, x):
    """name -> call, for one layer and input (the plan is computed once, outside)."""
    routing = lay.router(x)
    plan = lay.dispatch(routing, lay.cfg)
    return {"whole layer": lambda: lay(x), "stages": lambda: lay._stages(x, None), "router": lambda: lay.router(x),
            "dispatch": lambda: lay.dispatch(routing, lay.cfg),
            "experts, fused_step": lambda: decode.fused_step(x, plan, lay.experts, lay.shared),
            "experts, unfused": lambda: decode.fused_reference(x, plan, lay.experts, lay.shared)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=60)
    a, s = L.parse_with_config(ap, "fine", ["coarse", "fine"])
    ref, other_ref = L.build_all(s, ["none"])["moekit"], L.build_all(s, ["none"], seed=1)["moekit"]
    lay, other = ref.layer.eval(), other_ref.layer.eval()
    x = torch.randn(a.tokens, s.d)
    with torch.no_grad():
        parts, other_parts = parts_of(lay, x), parts_of(other, x)
        read, _, nbytes = L.active_weight_reader(ref, x)
        parts["weight read"] = read
        other_parts["weight read"] = L.active_weight_reader(other_ref, x)[0]
        res = L.interleaved(parts, a.rounds, before=other_parts)
    print(f"{a.config}, T = {a.tokens}, threads {a.threads}, median of {a.rounds} rounds; "
          f"weight read = {nbytes / 2**20:.1f} MiB")
    for k, v in res.items():
        print(f"{k:24s}{v * 1e6:8.0f} us")
    print(f"whole layer / weight read = {res['whole layer'] / res['weight read']:.2f}")


if __name__ == "__main__":
    main()

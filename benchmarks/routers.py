"""Forward+backward throughput of each router on the fine-grained config, as a ratio to
the dense-equivalent FFN (higher is better; 1.0 = as fast as the dense layer).

Fine config (DeepSeekMoE-style): d_model 1024, E = 64 experts of F = 352, top_k 8, one
shared expert of 704; dense twin: benchmarks/layer.py's dense limit (its `dense-gemm`
row: a SwiGLU FFN of hidden K·F + 704 = 3520, the same active FLOPs per token, on
moekit's Linear, plus the router matmul). T = 4096 tokens, as 4 sequences of 1024 (Soft MoE mixes within a
sequence). A step is forward, backward of <y, g> (+ aux loss) with a fixed g.
Rounds interleave every variant (order rotated each round) so load drift on a shared
machine hits all alike; the median round time is reported.

Routers whose number of experts per token is not top_k are shown in the states that
matter: `soft` uses all 64 experts (8x the expert FLOPs); `dselect_k` and `dts` are
dense at initialisation / at the start of their schedule and sparse when converged
(dselect_k: router weights scaled up so every smooth-step saturates; dts: schedule at its
end); `soft_moe` uses S/E = 16 slots per expert (slots = tokens, the paper's default), so
its experts see 1/8 of the token-choice rows but it adds two (S x slots x D) mixes.

    python benchmarks/routers.py                       # all, 3 rounds, 2 threads
    python benchmarks/routers.py --only hash expert_choice --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import layer as L  # noqa: E402  (benchmarks/layer.py: its dense limit)

from moekit import MoEConfig, MoELayer
from moekit.layers import Linear
from moekit.moe.router.dts import step_dts_schedule
from moekit.training import keep_freed_memory

Step = Callable[[], None]


def fine_config(args, **kw) -> MoEConfig:
    base = dict(d_model=args.d_model, num_experts=64, top_k=8, d_ff=352, num_shared_experts=1,
                shared_d_ff=704)
    base.update(kw)
    return MoEConfig(**base)


def variants(args) -> dict[str, Callable[[], torch.nn.Module]]:
    def layer(**kw):
        return lambda: MoELayer(fine_config(args, **kw))

    def dselect_saturated():
        m = MoELayer(fine_config(args, router="dselect_k"))
        with torch.no_grad():
            k_m = m.router.top_k * m.router.num_bits
            m.router.weight[:k_m].mul_(1e4)  # codes |z| >> γ/2: every selector one-hot (α untouched)
        return m

    def dts_end():
        m = MoELayer(fine_config(args, router="dts", router_options={"anneal_steps": 10}))
        step_dts_schedule(m, 10)
        return m

    return {
        "topk_softmax": layer(),
        "expert_choice": layer(router="expert_choice", capacity_factor=1.0),
        "hash": layer(router="hash", router_options={"vocab_size": 50_000}),
        "soft": layer(router="soft"),
        "soft_moe": layer(router="soft_moe", router_options={"slots_per_expert": args.seq // 64}),
        "dselect_k@init": layer(router="dselect_k"),
        "dselect_k@converged": dselect_saturated,
        "dts@start": layer(router="dts"),
        "dts@end": dts_end,
    }


@torch.no_grad()
def experts_per_token(model: torch.nn.Module, x: torch.Tensor, ids: torch.Tensor) -> float:
    """Routed rows per token of one forward (expert rows per token for soft_moe slots)."""
    if not isinstance(model, MoELayer):
        return float("nan")
    return float(model(x, token_ids=ids).stats.tokens_per_expert.sum()) / (x.numel() // x.shape[-1])


def make_step(model: torch.nn.Module, x: torch.Tensor, ids: torch.Tensor, g: torch.Tensor) -> Step:
    def step() -> None:
        x_ = x.detach().requires_grad_()
        if isinstance(model, MoELayer):
            out = model(x_, token_ids=ids)
            ((out.y * g).sum() + out.aux_loss).backward()
        else:
            ((model(x_) * g).sum()).backward()
        model.zero_grad(set_to_none=True)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None, help="router variants to run (default: all)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    # glibc's malloc thresholds as `moekit train` and benchmarks/layer.py set them, for every
    # variant alike: under the defaults, freed buffers came back as fresh pages for some
    # models and not others (layer.py's docstring has the numbers)
    keep_freed_memory()
    torch.manual_seed(0)
    x = torch.randn(a.batch, a.seq, a.d_model)
    g = torch.randn_like(x)
    ids = torch.randint(0, 50_000, (a.batch, a.seq))
    builders = variants(a)
    names = [n for n in builders if a.only is None or n in a.only or n.split("@")[0] in a.only]
    # the dense limit of benchmarks/layer.py (its `dense-gemm` row) at this shape
    dense = L.Dense(L.Shape(d=a.d_model, E=64, k=8, F=352, T=a.batch * a.seq, shared_F=704), Linear)
    models = {"dense": dense, **{n: builders[n]().train() for n in names}}
    steps = {n: make_step(m, x, ids, g) for n, m in models.items()}
    rows = {n: experts_per_token(m, x, ids) for n, m in models.items()}
    for s in steps.values():  # warm-up
        s()
    times: dict[str, list[float]] = {n: [] for n in steps}
    order = list(steps)
    for r in range(a.rounds):
        for n in order[r % len(order):] + order[: r % len(order)]:
            t0 = time.perf_counter()
            steps[n]()
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"fwd+bwd, T={a.batch * a.seq} (B={a.batch} x S={a.seq}), d={a.d_model}, E=64, k=8, F=352, "
          f"shared 704; dense hidden 3520; {a.threads} threads, median of {a.rounds} rounds")
    print(f"{'variant':22s}{'rows/token':>11s}{'median s':>10s}{'dense/variant':>15s}")
    for n in steps:
        print(f"{n:22s}{rows[n]:11.2f}{med[n]:10.3f}{med['dense'] / med[n]:15.3f}")


if __name__ == "__main__":
    main()

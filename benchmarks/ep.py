"""Expert parallelism on CPU (gloo): step time and all-to-all bytes, EP=1 vs EP=2, and
`moekit plan` for DeepSeek-V3 and Mixtral 8x22B beside the published figures.

    python benchmarks/ep.py                       # layer step times + bytes
    python benchmarks/ep.py --plan CONFIG_DIR     # also the plan rows (reads CONFIG_DIR/*.json)

EP=1: one process runs the whole global batch through the unsharded layer.
EP=2: two processes (gloo, this machine) each run half the batch; experts sharded.
Both: one MoELayer (fp32) forward+backward per step, median of --steps after 2 warm-ups.
Bytes: rows each rank sends to the other rank in the dispatch all-to-all, times D x 4 B;
combine returns the same rows, backward repeats both (4 transfers per step in all).
On a 2-core machine, 2 EP ranks share the cores with each other, so this measures the
overhead of the all-to-all path, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch


def layer_cfg(args):
    from moekit import MoEConfig

    return MoEConfig(d_model=args.d_model, num_experts=args.experts, top_k=args.top_k, d_ff=args.d_ff)


def time_steps(layer, x_TD, steps: int, barrier=None) -> tuple[float, object]:
    times, out = [], None
    for i in range(steps + 2):
        if barrier:
            barrier()
        t0 = time.perf_counter()
        out = layer(x_TD)
        out.y.sum().backward()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def worker(rank: int, world: int, store: str, args) -> dict:
    import torch.distributed as dist

    from moekit import MoELayer
    from moekit.distributed import expert_parallel

    torch.set_num_threads(args.threads)
    cfg = layer_cfg(args)
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    x_all = torch.randn(args.tokens, cfg.d_model)
    if world == 1:
        t, _ = time_steps(layer, x_all, args.steps)
        return {"step_s": t, "a2a_bytes_sent": 0}
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    expert_parallel(layer, ep_size=world)
    n = args.tokens // world
    t, out = time_steps(layer, x_all[rank * n:(rank + 1) * n], args.steps, dist.barrier)
    counts_E = out.stats.tokens_per_expert  # rows this rank sent to each global expert
    per_rank = counts_E.view(world, -1).sum(1)
    off_rank = int(per_rank.sum() - per_rank[rank])
    dist.destroy_process_group()
    return {"step_s": t, "a2a_bytes_sent": 4 * off_rank * cfg.d_model * 4}


def launch(world: int, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, __file__, "--worker", "--world", str(world), "--tmp", tmp] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k in ("tokens", "d_model", "d_ff", "experts", "top_k", "steps", "threads")]
        procs = [subprocess.Popen(argv + ["--rank", str(r)], stdout=subprocess.PIPE, text=True)
                 for r in range(world)]
        outs = [p.communicate(timeout=600)[0] for p in procs]
        return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def plan_rows(config_dir: Path) -> None:
    from moekit.distributed.plan import PlanInput, format_plan, plan

    runs = [
        ("deepseek-v3.json", PlanInput(devices=2048, ep=64, pp=16, batch_tokens=15360 * 4096, seq=4096,
                                       moment_dtype="bf16", recompute="none")),
        ("deepseek-v3.json", PlanInput(devices=2048, ep=64, pp=16, batch_tokens=15360 * 4096, seq=4096,
                                       moment_dtype="bf16", recompute="full")),
        ("mixtral-8x22b.json", PlanInput(devices=64, ep=8, tp=2, pp=4, batch_tokens=4 * 2**20, seq=4096)),
    ]
    for name, inp in runs:
        cfg = json.loads((config_dir / name).read_text())
        print(format_plan(plan(cfg, inp), name), "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096, help="global tokens per step")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    ap.add_argument("--plan", type=Path, default=None, help="folder with deepseek-v3.json, mixtral-8x22b.json")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--rank", type=int, default=0)
    ap.add_argument("--world", type=int, default=1)
    ap.add_argument("--tmp", default="")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.rank, args.world, os.path.join(args.tmp, "store"), args)))
        return
    print(f"MoELayer D={args.d_model} F={args.d_ff} E={args.experts} K={args.top_k}, "
          f"{args.tokens} tokens/step, fp32, {args.threads} thread(s)/process, "
          f"load average {os.getloadavg()[0]:.1f}")
    for world in (1, 2):
        res = launch(world, args)
        step = max(r["step_s"] for r in res)
        sent = [r["a2a_bytes_sent"] for r in res]
        print(f"EP={world}: step {step * 1e3:.1f} ms (slowest rank, median of {args.steps}); "
              f"all-to-all bytes sent per rank per step {sent}")
    if args.plan is not None:
        plan_rows(args.plan)


if __name__ == "__main__":
    main()

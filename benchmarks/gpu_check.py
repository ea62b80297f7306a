"""Check and time moekit on a GPU in one run: what to do the first time a CUDA machine is at hand.

    python benchmarks/gpu_check.py            # on a CUDA machine: ~3-8 minutes
    python benchmarks/gpu_check.py --dry-run  # anywhere: tiny sizes on the CPU (CI runs this)

1. parity: every router x dispatch x expert kind, with the experts on each
   implementation that runs on the device (grouped_mm, and the CPU wing on a CPU) in
   float32 and bfloat16, against the loop oracle on the same device: the output and the
   gradients of the input and of every parameter (fp32 within 1e-4, bf16 within 6e-2
   relative to each tensor's largest value).
2. speed: one MoE layer (benchmarks/layer.py's coarse, fine and many shapes) forward and
   forward+backward, against the dense limit (a SwiGLU FFN of the same active width plus
   the router product) and transformers' Qwen3-MoE block on its grouped_mm experts;
   then one training step of the default preset `tiny` and of its dense twin.
It prints one table per part and a last line "gpu_check: N failed" (exit code 1 if any
failed). Part 2 stops early once --budget seconds are spent.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import layer as L  # noqa: E402  (benchmarks/layer.py: shapes, the dense limit, transformers' blocks)

from moekit import MoEConfig, MoELayer  # noqa: E402
from moekit.moe.dispatch import DISPATCHERS  # noqa: E402
from moekit.moe.experts import ACTIVATIONS  # noqa: E402
from moekit.moe.router import ROUTERS  # noqa: E402

TOL = {torch.float32: 1e-4, torch.bfloat16: 6e-2}


def impls_on(device: str) -> list[str]:
    return ["grouped_mm"] + (["cpu"] if device == "cpu" else [])


def parity_case(router: str, dispatch: str, expert: str, impl: str, dtype, device: str) -> str:
    """'ok', 'skip: ...' or 'FAIL: ...' for one combination."""
    kw = dict(d_model=16, num_experts=4, top_k=2, d_ff=8, router=router, dispatch=dispatch, expert=expert,
              capacity_factor=0.75, num_shared_experts=1, shared_d_ff=8, init_std=0.5)
    try:
        cfg = MoEConfig(**kw)
    except ValueError as e:
        return f"skip: {e}"
    torch.manual_seed(0)
    fast = MoELayer(cfg.replace(experts_impl=impl)).to(device, dtype).eval()
    ref = MoELayer(cfg.replace(experts_impl="loop")).to(device, dtype).eval()
    ref.load_state_dict(fast.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 16, generator=g).to(device, dtype)
    ids = torch.randint(0, 50, (2, 6), generator=g).to(device)
    results = []
    for layer in (fast, ref):
        xi = x.clone().requires_grad_()
        y = layer(xi, token_ids=ids).y
        (y.float() * torch.linspace(-1, 1, y.numel(), device=device).view_as(y)).sum().backward()
        results.append([("y", y), ("x", xi.grad)] + [(n, p.grad) for n, p in layer.named_parameters()])
    for (name, a), (_, b) in zip(*results, strict=True):
        if (a is None) != (b is None):
            return f"FAIL: gradient of {name} on one side only"
        if a is None:
            continue
        scale = b.float().abs().max().item() or 1.0
        err = (a.float() - b.float()).abs().max().item() / scale
        if not err <= TOL[dtype]:
            return f"FAIL: {name} off by {err:.2e} of its scale"
    return "ok"


def part_parity(device: str, experts: list[str]) -> int:
    print(f"\n== 1. parity against the loop oracle on {device}")
    failed, counts = 0, {}
    for impl in impls_on(device):
        for dtype in (torch.float32, torch.bfloat16):
            ok = skipped = 0
            for router in ROUTERS.names():
                for dispatch in DISPATCHERS.names():
                    for expert in experts:
                        res = parity_case(router, dispatch, expert, impl, dtype, device)
                        ok += res == "ok"
                        skipped += res.startswith("skip")
                        if res.startswith("FAIL"):
                            failed += 1
                            print(f"  {impl} {str(dtype)[6:]} {router}/{dispatch}/{expert}: {res}")
            counts[(impl, dtype)] = (ok, skipped)
    print(f"{'experts_impl':12s} {'dtype':9s} {'ok':>4s} {'skipped':>8s}")
    for (impl, dtype), (ok, skipped) in counts.items():
        print(f"{impl:12s} {str(dtype)[6:]:9s} {ok:4d} {skipped:8d}")
    return failed


def _timed(fn, device: str, rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _layer_rows(s: L.Shape, device: str, dtype) -> dict:
    L.DTYPE = dtype
    mods = L.build_all(s, ["qwen3-grouped_mm"])
    return {n: m.to(device) for n, m in mods.items() if n in ("dense", "moekit", "qwen3-grouped_mm")}


def part_speed(device: str, shapes: dict, dtype, rounds: int, budget: float, started: float) -> None:
    print(f"\n== 2. speed on {device}, {str(dtype)[6:]}: ms (ratio = throughput / the dense limit's)")
    print(f"{'config':8s} {'impl':18s} {'fwd ms':>9s} {'ratio':>6s} {'fwd+bwd ms':>11s} {'ratio':>6s}")
    for name, s in shapes.items():
        if time.monotonic() - started > budget:
            print(f"(stopped: --budget {budget:.0f} s spent)")
            return
        mods = _layer_rows(s, device, dtype)
        x = torch.randn(max(1, s.T // L.SEQ), min(L.SEQ, s.T), s.d, device=device, dtype=dtype)
        dy = torch.randn_like(x)
        xg = x.clone().requires_grad_()
        res = {}
        for n, m in mods.items():
            fwd = L.make_step(m, x, None)
            fb = L.make_step(m, xg, dy)
            res[n] = (_timed(fwd, device, rounds), _timed(fb, device, rounds))
        for n, (f, b) in res.items():
            print(f"{name:8s} {n:18s} {f * 1e3:9.2f} {res['dense'][0] / f:6.3f} {b * 1e3:11.2f} "
                  f"{res['dense'][1] / b:6.3f}")


def part_train_step(device: str, rounds: int, dry: bool) -> None:
    from moekit.models import MoELM, get_preset

    print(f"\n== 3. one training step of the default preset on {device} (batch 16 x 128 bytes, AdamW)")
    for preset in ("tiny", "dense"):
        torch.manual_seed(0)
        cfg = get_preset(preset, 260)
        if dry:
            cfg = cfg.replace(n_layers=1)
        model = MoELM(cfg).to(device).train()
        ids = torch.randint(0, 256, (4 if dry else 16, 32 if dry else 128), device=device)
        step = _train_step(model, torch.optim.AdamW(model.parameters(), lr=1e-3), ids)
        print(f"{preset:8s} {_timed(step, device, rounds) * 1e3:9.2f} ms per step")


def _train_step(model, opt, ids):
    def step() -> None:
        out = model(ids, targets_BS=ids)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: checks the script itself")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--budget", type=float, default=300.0, help="seconds of part 2 after which it stops")
    a = ap.parse_args()
    started = time.monotonic()
    device = "cpu" if a.dry_run or not torch.cuda.is_available() else "cuda"
    if device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    else:
        print(f"no CUDA device{' (dry run)' if a.dry_run else ''}: running on the CPU, torch {torch.__version__}")
    # the dry run checks the script, not the kernels: one expert kind (the suite does the rest)
    failed = part_parity(device, ["swiglu"] if a.dry_run else ACTIVATIONS.names())
    shapes = L.SMOKE if a.dry_run else L.CONFIGS
    rounds = 1 if a.dry_run else a.rounds
    speed_started = time.monotonic()
    for dtype in (torch.float32, torch.bfloat16):
        part_speed(device, shapes, dtype, rounds, a.budget, speed_started)
    part_train_step(device, rounds, a.dry_run)
    print(f"\ngpu_check: {failed} failed, {time.monotonic() - started:.0f} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

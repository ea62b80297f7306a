"""One MoE layer against its peers and against the dense limit, side by side in ONE process.

    python benchmarks/layer.py [--config coarse|fine|many|decode|all] [--rounds N]
        [--impls moekit,qwen3-grouped_mm,...] [--no-mem] [--threads 2] [--clock wall|cpu]
        [--dtype float32|bfloat16] [--smoke]

What it times (torch.set_num_threads(2) unless --threads, fp32 unless --dtype, CPU):
  moekit        MoELayer: dropless, topk_softmax, swiglu, experts_impl "auto" (+ shared for
                fine); decode steps on the layer prepared for inference, as generation does
  dense         a plain SwiGLU FFN (gate/up/down nn.Linear, torch's CPU kernel: MKL) of hidden
                K·F + shared width, plus the router matmul (D -> E) whose logits also get a gradient
  dense-gemm    the same FFN on moekit.layers.Linear, i.e. on the GEMM kernel moekit's experts
                use (ops/gemm.py: oneDNN on CPU). The limit is the faster of the two dense rows.
  moekit-torchgemm  moekit under settings gemm="torch" (torch's kernel for every product
                moekit chooses one for)
  moekit-grouped_mm moekit with experts_impl "grouped_mm" (torch's grouped GEMM)
  mixtral-*     transformers MixtralSparseMoeBlock, config._experts_implementation "eager"
                or "grouped_mm" (on fine, plus a transformers Qwen2MoeMLP shared expert)
  qwen3-*       transformers Qwen3MoeSparseMoeBlock, same two implementations (same + shared)
  qwen2-*       transformers Qwen2MoeSparseMoeBlock (fine only: its own gated shared expert)
  lucidrains    mixture_of_experts.MoE: top-2 only (so coarse only), ReLU experts of hidden
                1.5·F (equal FLOPs to SwiGLU F), second_policy "all", capacity factor 2.5,
                gate re-initialised to std 1/√d
  st-moe        st_moe_pytorch.MoE: GEGLU experts of hidden F, top-k, thresholds 1e-9 so every
                top-k expert is used, capacity factor 1.25·k (its capacity counts all k choices)

The transformers blocks get moekit's weights (same [gate|up] / down layout and router), so
their outputs must match moekit's: the "check" line prints the max difference.
Inputs are (B, S, D) with S = 1024 (T = B·S); routers are initialised with std 1/√d so that
random inputs route about evenly.

Timing: one warm-up call of everything, then ROUNDS interleaved rounds (A B C, B C A, ...:
the order rotates, as what ran just before a call changes its time); each cell is the
median over rounds. "fwd" is an inference forward under torch.no_grad();
"fwd+bwd" is a training forward plus backward of a fixed random dy (parameter gradients
are set to None before each call, so every call allocates them the same way).
ratio = throughput / the limit's throughput in the same mode (the limit = the faster of dense
and dense-gemm; 1.0 is the limit for an MoE layer).
The machine may be shared: absolute times drift, interleaved ratios much less.
--impls builds only the rows it names (and dense, moekit); a peer whose package is
missing is skipped with a line saying so. --smoke runs every config at a tiny size,
once (what CI runs to keep the script working; its numbers mean nothing).

Allocator: the timing process first sets glibc's malloc thresholds as `moekit train` does
(training/heap.py), for every implementation alike; --glibc-heap keeps glibc's defaults.
Under the defaults, buffers freed and reallocated on every call came back as fresh pages
for some implementations and not others, depending on the process's history: the dense
limit on `many` (32 MiB intermediates) measured 45-49 ms forward and 135-147 ms
forward+backward, against 36 and 116 ms with the thresholds set (session 9), which
made the MoE/dense ratios look ~25% better than they are.

Peak memory (fine, fwd+bwd): each implementation runs in a fresh subprocess, which builds
the layer and its input, runs one warm-up fwd+bwd, drops the gradients, then resets the
kernel's peak-RSS counter (writing 5 to /proc/self/clear_refs resets VmHWM), runs one
fwd+bwd and reports VmHWM - VmRSS before it. RSS counts what the process really touches,
whatever allocator path a library uses (glibc heap or mmap), so the number is the same
kind for every implementation; it includes the parameter gradients (the same for all but
dense; moekit's pooled gradient buffers, ops/grad_pool.py, are released before the
measured step so that they count too) and every temporary alive at the peak.

Decode (T = 1 and T = 8, forward only, coarse and fine): besides the layers it times a
weight read of the experts the tokens actually use (plus router and shared expert): a
sum over those weight slices, the memory traffic a decode step cannot avoid. It prints
moekit's decode time / weight-read time (issue 2 target: ≤ 1.2 at T = 1). Each timed
call follows, untimed, a call of a second layer of the same kind with other weights (a
model's other layer): as in a real decode step, the code is warm and the timed layer's
weights are out of cache (the second layer's reads evicted them). Without that, a call
that follows another reading the same experts (the weight read after moekit-torchgemm)
found part of them in the 32 MiB L3 and looked faster.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from moekit.inference import prepare_for_inference
from moekit.ops import grad_pool
from moekit.ops.tune import cpu_name
from moekit.training import keep_freed_memory

THREADS = 2
ALWAYS = ("dense", "dense-gemm", "moekit")
SEQ = 1024
CLOCK = time.perf_counter  # --clock cpu: time.process_time (with --threads 1 on a busy machine)


@dataclass(frozen=True)
class Shape:
    d: int
    E: int
    k: int
    F: int
    T: int
    shared_F: int = 0


CONFIGS = {
    "coarse": Shape(d=1024, E=8, k=2, F=2816, T=4096),
    "fine": Shape(d=1024, E=64, k=8, F=352, T=4096, shared_F=704),
    "many": Shape(d=512, E=128, k=4, F=128, T=8192),
}
SMOKE = {  # --smoke: the same kinds of layer, small enough for CI
    "coarse": Shape(d=64, E=8, k=2, F=128, T=256),
    "fine": Shape(d=64, E=16, k=4, F=32, T=256, shared_F=64),
    "many": Shape(d=64, E=32, k=4, F=16, T=512),
}
DTYPE = torch.float32  # --dtype


# ----------------------------------------------------------------------------- builders
# Each builder returns an nn.Module whose forward(x (B, S, D)) returns y (B, S, D), or
# None where the peer cannot express the shape.


class Dense(nn.Module):
    """SwiGLU FFN of hidden K·F + shared width, plus the router matmul (the MoE limit)."""

    def __init__(self, s: Shape, lin=nn.Linear) -> None:
        super().__init__()
        H = s.k * s.F + s.shared_F
        self.gate = lin(s.d, H, bias=False)
        self.up = lin(s.d, H, bias=False)
        self.down = lin(H, s.d, bias=False)
        self.router = lin(s.d, s.E, bias=False)
        for m in (self.gate, self.up, self.down):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, x):
        y = self.down(nn.functional.silu(self.gate(x)) * self.up(x))
        # the router's logits join the output through a zero-cost path so that their
        # matmul (and its backward) is paid exactly as in an MoE layer
        logits = self.router(x)
        return y + (logits.sum(-1, keepdim=True) * 0.0)


class MoekitLayer(nn.Module):
    def __init__(self, s: Shape, gemm: str | None = None, impl: str = "auto") -> None:
        super().__init__()
        self.gemm = gemm
        from moekit import MoEConfig, MoELayer

        cfg = MoEConfig(d_model=s.d, num_experts=s.E, top_k=s.k, d_ff=s.F, router="topk_softmax",
                        dispatch="dropless", expert="swiglu", experts_impl=impl,
                        num_shared_experts=1 if s.shared_F else 0, shared_d_ff=s.shared_F or None)
        self.layer = MoELayer(cfg)
        nn.init.normal_(self.layer.router.weight, std=s.d ** -0.5)

    def forward(self, x):
        from moekit import settings

        with contextlib.nullcontext() if self.gemm is None else settings.use(gemm=self.gemm):
            return self.layer(x).y


class WithShared(nn.Module):
    """A transformers block plus a transformers shared expert (Qwen2MoeMLP) beside it."""

    def __init__(self, block: nn.Module, shared: nn.Module | None) -> None:
        super().__init__()
        self.block, self.shared = block, shared

    def forward(self, x):
        y = self.block(x)
        return y if self.shared is None else y + self.shared(x)


def _shared_mlp(s: Shape):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeMLP

    cfg = Qwen2MoeConfig(hidden_size=s.d, intermediate_size=s.shared_F, hidden_act="silu")
    return Qwen2MoeMLP(cfg, intermediate_size=s.shared_F)


def _copy_moekit_weights(block: nn.Module, ref: MoekitLayer, shared: nn.Module | None) -> None:
    """Same layout as moekit: experts.gate_up_proj (E, 2F, D), experts.down_proj (E, D, F)."""
    lay = ref.layer
    with torch.no_grad():
        block.gate.weight.copy_(lay.router.weight)
        block.experts.gate_up_proj.copy_(lay.experts.w_in)
        block.experts.down_proj.copy_(lay.experts.w_out)
        if shared is not None:
            F = lay.shared.ffn.w_out.shape[1]
            shared.gate_proj.weight.copy_(lay.shared.ffn.w_in[:F])
            shared.up_proj.weight.copy_(lay.shared.ffn.w_in[F:])
            shared.down_proj.weight.copy_(lay.shared.ffn.w_out)


def build_transformers(kind: str, impl: str, s: Shape, ref: MoekitLayer) -> nn.Module:
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    if kind == "mixtral":
        cfg = MixtralConfig(hidden_size=s.d, intermediate_size=s.F, num_local_experts=s.E,
                            num_experts_per_tok=s.k, router_jitter_noise=0.0)
        block = MixtralSparseMoeBlock(cfg)
    elif kind == "qwen3":
        cfg = Qwen3MoeConfig(hidden_size=s.d, moe_intermediate_size=s.F, num_experts=s.E,
                             num_experts_per_tok=s.k, norm_topk_prob=True)
        block = Qwen3MoeSparseMoeBlock(cfg)
    else:  # qwen2: its own shared expert with a sigmoid gate (fine only)
        cfg = Qwen2MoeConfig(hidden_size=s.d, moe_intermediate_size=s.F, num_experts=s.E,
                             num_experts_per_tok=s.k, norm_topk_prob=True,
                             shared_expert_intermediate_size=s.shared_F)
        block = Qwen2MoeSparseMoeBlock(cfg)
    cfg._experts_implementation = impl
    if kind == "qwen2":
        _copy_moekit_weights(block, ref, block.shared_expert)
        nn.init.normal_(block.shared_expert_gate.weight, std=0.02)
        return block
    shared = _shared_mlp(s) if s.shared_F else None
    _copy_moekit_weights(block, ref, shared)
    return WithShared(block, shared)


class Lucidrains(nn.Module):
    def __init__(self, s: Shape) -> None:
        super().__init__()
        from mixture_of_experts import MoE

        self.moe = MoE(dim=s.d, num_experts=s.E, hidden_dim=int(1.5 * s.F), activation=nn.ReLU,
                       second_policy_train="all", second_policy_eval="all",
                       capacity_factor_train=2.5, capacity_factor_eval=2.5)
        # its default gate init is randn: logits grow with √d and routing collapses
        nn.init.normal_(self.moe.gate.w_gating, std=s.d ** -0.5)

    def forward(self, x):
        return self.moe(x)[0]


class STMoE(nn.Module):
    def __init__(self, s: Shape) -> None:
        super().__init__()
        from st_moe_pytorch import MoE
        from st_moe_pytorch.st_moe_pytorch import Expert

        mult = s.F * 3 / (2 * s.d)  # Expert's hidden = int(d · mult · 2/3) = F
        experts = [Expert(dim=s.d, hidden_mult=mult) for _ in range(s.E)]
        hidden = experts[0].net[-1].in_features
        assert hidden == s.F, (hidden, s.F)
        self.moe = MoE(dim=s.d, num_experts=s.E, gating_top_n=s.k, experts=nn.ModuleList(experts),
                       threshold_train=1e-9, threshold_eval=1e-9,
                       capacity_factor_train=1.25 * s.k, capacity_factor_eval=1.25 * s.k)
        nn.init.normal_(self.moe.gate.to_gates.weight, std=s.d ** -0.5)

    def forward(self, x):
        return self.moe(x)[0]


def parse_with_config(ap: argparse.ArgumentParser, default: str, choices: list[str]):
    """Adds --config and --threads to another benchmark's parser, parses, sets the thread
    count; returns (args, the config's Shape)."""
    ap.add_argument("--config", default=default, choices=choices)
    ap.add_argument("--threads", type=int, default=THREADS)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    return a, CONFIGS[a.config]


def build_all(s: Shape, names: list[str] | None = None, seed: int = 0) -> dict[str, nn.Module]:
    """dense and moekit always; the peers whose shapes fit, only those in `names` if given
    (a peer whose package is missing is skipped with a line saying so)."""
    torch.manual_seed(seed)
    ref = MoekitLayer(s)
    from moekit.layers import Linear

    wanted = (lambda n: True) if names is None else (lambda n: n in names or n in ALWAYS)
    mods: dict[str, nn.Module] = {"dense": Dense(s), "dense-gemm": Dense(s, Linear), "moekit": ref}
    builders = {"moekit-torchgemm": lambda: MoekitLayer(s, gemm="torch"),
                "moekit-grouped_mm": lambda: MoekitLayer(s, impl="grouped_mm")}
    for kind in ("mixtral", "qwen3") + (("qwen2",) if s.shared_F else ()):
        for impl in ("eager", "grouped_mm"):
            builders[f"{kind}-{impl}"] = functools.partial(build_transformers, kind, impl, s, ref)
    if s.k == 2 and not s.shared_F:
        builders["lucidrains"] = functools.partial(Lucidrains, s)
    if s.k >= 2 and not s.shared_F:  # st-moe has no shared expert
        builders["st-moe"] = functools.partial(STMoE, s)
    for name, build in builders.items():
        if not wanted(name):
            continue
        try:
            mods[name] = build()
        except ImportError as e:
            print(f"(skipping {name}: {e})", file=sys.stderr)
    if "moekit-torchgemm" in mods:
        mods["moekit-torchgemm"].load_state_dict(ref.state_dict())
    if "moekit-grouped_mm" in mods:
        mods["moekit-grouped_mm"].load_state_dict(ref.state_dict())
    return {n: m.to(DTYPE) for n, m in mods.items()}


# ----------------------------------------------------------------------------- timing


def _zero_grads(m: nn.Module, x: torch.Tensor) -> None:
    for p in m.parameters():
        p.grad = None
    x.grad = None


def make_step(m: nn.Module, x: torch.Tensor, dy: torch.Tensor | None):
    if dy is None:
        def fwd():
            with torch.no_grad():
                m(x)
        return fwd

    def fwd_bwd():
        _zero_grads(m, x)
        m(x).backward(dy)
    return fwd_bwd


def interleaved(steps: dict[str, callable], rounds: int,
                before: dict[str, callable] | None = None) -> dict[str, float]:
    """Median seconds per step over `rounds` interleaved rounds (order rotating), after one
    warm-up each; before[name], if given, runs untimed right before each timed call of
    steps[name]."""
    for f in steps.values():
        f()
    times: dict[str, list[float]] = {n: [] for n in steps}
    names = list(steps)
    for i in range(rounds):
        # the order rotates each round: what ran just before a call changes its time
        # (measured: a decode step after a plain sum() over other weights took 1.4x as
        # long as after a moekit kernel call), so no implementation keeps one neighbour
        for n in names[i % len(names):] + names[: i % len(names)]:
            f = steps[n]
            if before is not None:
                before[n]()
            t0 = CLOCK()
            f()
            times[n].append(CLOCK() - t0)
    return {n: statistics.median(v) for n, v in times.items()}


def limit(times: dict[str, float]) -> float:
    """Seconds per step of the faster dense FFN (torch's kernel or moekit's gemm)."""
    return min(times["dense"], times.get("dense-gemm", times["dense"]))


def check_outputs(mods: dict[str, nn.Module], x: torch.Tensor) -> str:
    """transformers blocks carry moekit's weights: their outputs must match moekit's."""
    with torch.no_grad():
        ref = mods["moekit"](x)
        diffs = [f"{n} {(mods[n](x) - ref).abs().max().item():.1e}" for n in mods
                 if n.startswith(("mixtral", "qwen3"))]
    return "check (max |y - y_moekit|): " + (", ".join(diffs) or "no transformers block")


def bench_config(name: str, rounds: int, mem: bool, only: list[str] | None) -> None:
    s = CONFIGS[name]
    mods = build_all(s, only)
    x = torch.randn(max(1, s.T // SEQ), min(SEQ, s.T), s.d, dtype=DTYPE)
    print(f"\n== {name}: d={s.d} E={s.E} k={s.k} F={s.F}"
          + (f" shared F={s.shared_F}" if s.shared_F else "") + f" T={s.T}  (threads="
          f"{torch.get_num_threads()}, clock {CLOCK.__name__}, median of {rounds} interleaved rounds)")
    print(check_outputs(mods, x[:1, :256]))
    xg = x.clone().requires_grad_(True)
    dy = torch.randn_like(x) * s.d ** -0.5
    res = {}
    for mode in ("fwd", "fwd+bwd"):
        steps = {n: make_step(m, x if mode == "fwd" else xg, None if mode == "fwd" else dy)
                 for n, m in mods.items()}
        res[mode] = interleaved(steps, rounds)
        print(f"  [{mode} timed]", file=sys.stderr, flush=True)
    peak = peak_memory_all(name, list(mods)) if mem else {}
    print(f"{'impl':22s} {'fwd ms':>9s} {'tok/s':>9s} {'ratio':>6s}   {'fwd+bwd ms':>10s} "
          f"{'tok/s':>9s} {'ratio':>6s}" + (f"  {'peak MiB':>9s}" if peak else ""))
    for n in mods:
        cells = []
        for mode, w in (("fwd", 9), ("fwd+bwd", 10)):
            t = res[mode][n]
            cells.append(f"{t * 1e3:{w}.1f} {s.T / t:9.0f} {limit(res[mode]) / t:6.3f}")
        memcell = f"  {peak[n]:9.0f}" if n in peak else ""
        print(f"{n:22s} {cells[0]}   {cells[1]}{memcell}")
    peers = [n for n in mods if n.startswith(("mixtral", "qwen"))]
    if peers:
        best = min(peers, key=lambda n: res["fwd+bwd"][n])
        print(f"moekit vs best transformers ({best}) fwd+bwd: "
              f"{res['fwd+bwd'][best] / res['fwd+bwd']['moekit']:.2f}x")


# ----------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(name: str, impl: str) -> float:
    """In a fresh process: MiB of peak RSS growth of one fwd+bwd (see module docstring)."""
    s = CONFIGS[name]
    m = build_all(s, [impl])[impl]
    x = torch.randn(max(1, s.T // SEQ), min(SEQ, s.T), s.d, dtype=DTYPE, requires_grad=True)
    dy = torch.randn_like(x)
    step = make_step(m, x, dy)
    step()
    _zero_grads(m, x)
    # moekit keeps its expert gradient buffers from step to step (ops/grad_pool.py);
    # dropped here, so the measured step allocates them as every other row's does
    grad_pool.release()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) / 1024


def peak_memory_all(name: str, impls: list[str]) -> dict[str, float]:
    out = {}
    for impl in impls:
        cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(torch.get_num_threads()),
               "--dtype", str(DTYPE)[6:], "--_peak", name, impl]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"peak memory of {impl} failed: {r.stderr.strip()[-300:]}")
            continue
        out[impl] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


# ----------------------------------------------------------------------------- decode


def active_weight_reader(ref: MoekitLayer, x_TD: torch.Tensor):
    """Sum over the weights one decode step must read: router, used experts, shared."""
    lay = ref.layer
    with torch.no_grad():
        used = sorted(set(lay.router(x_TD).expert_ids_TK.reshape(-1).tolist()))
    slices = [lay.router.weight] + [w[e] for e in used for w in (lay.experts.w_in, lay.experts.w_out)]
    if lay.shared is not None:
        slices += [lay.shared.ffn.w_in, lay.shared.ffn.w_out]
    nbytes = sum(t.numel() * t.element_size() for t in slices)

    def read():
        with torch.no_grad():
            for t in slices:
                t.sum()
    return read, len(used), nbytes


def bench_decode(rounds: int, only: list[str] | None) -> None:
    print(f"\n== decode: forward only under no_grad (threads={torch.get_num_threads()}, "
          f"clock {CLOCK.__name__}, median of {max(rounds, 5) * 4} interleaved rounds)")
    print(f"{'config':7s} {'T':>2s} {'impl':22s} {'ms':>8s} {'ratio':>6s}")
    for name in ("coarse", "fine"):
        s = CONFIGS[name]
        # eval mode and prepared for inference, as generation runs a model
        mods = {n: m.eval() for n, m in build_all(s, only).items()}
        others = {n: m.eval() for n, m in build_all(s, only, seed=1).items()}  # a second layer of each kind: see the docstring
        for m in (*mods.values(), *others.values()):
            prepare_for_inference(m)
        for T in (1, 8):
            x = torch.randn(1, T, s.d, dtype=DTYPE)
            read, n_used, nbytes = active_weight_reader(mods["moekit"], x.reshape(T, s.d))
            steps = {n: make_step(m, x, None) for n, m in mods.items()}
            steps["weight-read"] = read
            before = {n: make_step(m, x, None) for n, m in others.items()}
            before["weight-read"] = active_weight_reader(others["moekit"], x.reshape(T, s.d))[0]
            res = interleaved(steps, max(rounds, 5) * 4, before=before)
            for n in mods:
                print(f"{name:7s} {T:2d} {n:22s} {res[n] * 1e3:8.3f} {limit(res) / res[n]:6.3f}")
            print(f"{name:7s} {T:2d} {'weight-read':22s} {res['weight-read'] * 1e3:8.3f}   "
                  f"({n_used} experts, {nbytes / 2**20:.1f} MiB, "
                  f"{nbytes / res['weight-read'] / 1e9:.1f} GB/s)")
            print(f"{name:7s} {T:2d} moekit / weight-read = {res['moekit'] / res['weight-read']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="all", choices=[*CONFIGS, "decode", "all"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-mem", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--impls", help="comma-separated subset (dense and moekit always run)")
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu = process CPU time: robust on a busy machine, but only with --threads 1")
    ap.add_argument("--glibc-heap", action="store_true",
                    help="keep glibc's default malloc thresholds (see 'Allocator' above)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one round (CI keeps the script working)")
    ap.add_argument("--_peak", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    global CLOCK, DTYPE
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter
    DTYPE = getattr(torch, a.dtype)
    if a.smoke:
        CONFIGS.update(SMOKE)
        a.rounds, a.no_mem = 1, True
    torch.set_num_threads(a.threads)
    if a._peak:
        print(json.dumps(peak_memory_child(*a._peak)))
        return
    kept = False if a.glibc_heap else keep_freed_memory()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {a.dtype}, "
          f"freed memory kept (training/heap.py): {kept}, CPU: {cpu_name()}")
    only = a.impls.split(",") if a.impls else None
    names = list(CONFIGS) if a.config == "all" else [a.config] if a.config in CONFIGS else []
    for name in names:
        bench_config(name, a.rounds, mem=(name == "fine" and not a.no_mem), only=only)
    if a.config in ("decode", "all"):
        bench_decode(a.rounds, only)


if __name__ == "__main__":
    main()

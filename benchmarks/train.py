"""Training throughput (tokens/s) of the `tiny` MoE preset against
  - its `dense` twin (same active parameters per token; target MoE/dense >= 0.85), and
  - transformers' MixtralForCausalLM (or Qwen3MoeForCausalLM) built with the same shapes
    (target moekit/HF >= 2x),
side by side in one process: rounds interleave the models (the order rotates each round)
so that drift in machine load hits all of them alike; the median round is reported.

A step is forward, loss (+ aux loss), backward, AdamW step, on a fresh random batch.
Run by hand (not a test):

    python benchmarks/train.py                      # 2 threads, batch 16 x 128 (moekit train default), 7 rounds
    python benchmarks/train.py --breakdown          # + fwd+bwd time per component
    python benchmarks/train.py --hf qwen3 --hf-experts eager

Measured 2026-11-22, session 2 (torch 2.13 CPU, 2-core shared VM, --threads 2 --rounds 5,
after moving products to oneDNN, ops/gemm.py), wall-clock tokens/s, two runs:
  MoE/dense 0.823 and 0.759; MoE/HF Mixtral 1.28x and 1.09x.
  oneDNN made the dense twin faster than the MoE (the tiny preset's experts are 128 wide:
  their GEMMs are small, and gather/scatter and the SwiGLU pass over R = T·K rows stay);
  with MOEKIT_GEMM=torch the same run gave MoE/dense 0.858, MoE/HF 1.12x.
  `--breakdown` (fwd+bwd, T=2048, wall ms): attention 11.1, dense FFN 6.1, MoE FFN 13.3
  (grouped experts 10.4, router 0.7, dispatch 0.1, losses+stats 0.1), HF Mixtral MoE block
  15.8, HF attention 13.2. Attention is ~half of a step, so the MoE layer alone cannot
  make the model 2x faster than transformers here.
Session 5 (whole experts per thread on CPU, moe/experts/by_expert.py), `--rounds 3`,
two runs each: MoE/dense 0.991 and 0.979, MoE/HF Mixtral 1.51x and 1.46x; the same
runs with MOEKIT_BY_EXPERT=0: 0.767 and 0.845, 1.30x and 1.42x.
Session 7 (q/k/v in one product, RMSNorm, routing, sort and transpose kernels, short-row
softmax, fused AdamW for all three models, 30 warm-up steps), quiet machine, `--rounds 5`
three runs: MoE/dense 0.793, 0.814, 0.802; MoE/HF 2.28x, 2.28x, 2.10x (MoE 32.6-36.2K
tok/s, dense 40.0-45.1K, HF 14.3-17.2K). `--hf none --rounds 9 --steps 10`: 0.887 and
0.835. The run-to-run spread is wider than the gap to 0.85. The shared parts (attention,
norms, projections) got faster for both moekit models, so MoE/dense fell from 0.91; the
MoE step's extra time is in the forward (at 2 threads ~1 ms per layer: the expert bank
~1.5 ms against the dense FFN's whole forward ~1.4, plus router, losses, dispatch and
combine ~0.7), while its backward is within ~0.1 ms of the dense one per layer.
Session 8 (prefetching and slot sums in the expert bank, 100 warm-up steps), `--rounds 7
--steps 10`: MoE/dense 0.816, 0.840, 0.856, 0.828, 0.839; MoE/HF 2.20x and 2.18x (the
runs where it was read). With 30 warm-up steps the timed rounds still held the MoE's
oneDNN kernel compiles (see run_rounds).
Session 9 (the bank's products on oneDNN's brgemm micro-kernel, ops/gemm.py:
bank_micro_kernel; glibc keeps freed memory, training/heap.py, for all three models as
`moekit train` does), `--rounds 7 --steps 10`: MoE/dense 0.878, 0.894, 0.884, 0.911;
MoE/HF 2.26x, 2.55x, 2.28x, 2.28x. With --glibc-heap (defaults) one run: 0.936, 2.41x;
before the slot-sum change another: 0.858, 2.29x.
  On a loaded machine 2-thread times mostly measure the scheduler (OpenMP barriers wait
  for descheduled threads); compare the CPU-second table, or rerun when idle.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from moekit.models import LMConfig, MoELM, get_preset
from moekit.models.lm import lm_loss
from moekit.training import keep_freed_memory

Step = Callable[[torch.Tensor], None]


def moekit_step(model: MoELM, opt: torch.optim.Optimizer) -> Step:
    def step(ids_BS: torch.Tensor) -> None:
        targets_BS = torch.roll(ids_BS, -1, dims=1)
        targets_BS[:, -1] = -100
        out = model(ids_BS, targets_BS=targets_BS)
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def build_hf(kind: str, cfg: LMConfig, experts_impl: str | None):
    """A transformers MoE LM with the shapes of cfg (experts, width, heads, layers, vocab)."""
    m = cfg.moe
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                  num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                  max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                  tie_word_embeddings=cfg.tie_embeddings, num_experts_per_tok=m.top_k,
                  router_aux_loss_coef=m.aux_loss_coef, output_router_logits=True,
                  attn_implementation="sdpa")
    if experts_impl:
        common["experts_implementation"] = experts_impl
    if kind == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        hf_cfg = MixtralConfig(intermediate_size=m.d_ff, num_local_experts=m.num_experts, **common)
        return MixtralForCausalLM(hf_cfg)
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    hf_cfg = Qwen3MoeConfig(moe_intermediate_size=m.d_ff, num_experts=m.num_experts,
                            intermediate_size=cfg.dense_d_ff, norm_topk_prob=True,
                            head_dim=cfg.head_size, **common)
    return Qwen3MoeForCausalLM(hf_cfg)


def hf_step(model, opt: torch.optim.Optimizer) -> Step:
    def step(ids_BS: torch.Tensor) -> None:
        out = model(input_ids=ids_BS, labels=ids_BS)  # shifts inside; loss includes aux
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def build_all(args) -> dict[str, Step]:
    torch.manual_seed(0)
    tiny_cfg = get_preset("tiny", args.vocab).replace(max_seq_len=max(args.seq, 256))
    models = {"moekit tiny (MoE)": MoELM(tiny_cfg),
              "moekit dense": MoELM(get_preset("dense", args.vocab).replace(max_seq_len=tiny_cfg.max_seq_len))}
    if args.hf != "none":
        models[f"HF {args.hf} ({args.hf_experts or 'default'})"] = build_hf(args.hf, tiny_cfg, args.hf_experts)
    steps = {}
    for name, model in models.items():
        model.train()
        # fused, as moekit's trainer builds it (training/step.py), for every model alike
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        n = sum(p.numel() for p in model.parameters())
        print(f"  {name:32s} {n / 1e6:6.2f}M params")
        steps[name] = (moekit_step if isinstance(model, MoELM) else hf_step)(model, opt)
    return steps


def run_rounds(steps: dict[str, Step], args) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """tokens per wall-clock second, and per CPU second of this process (the second is
    steadier on a shared machine: time spent descheduled is not counted)."""
    gen = torch.Generator().manual_seed(1)
    batch = lambda: torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)  # noqa: E731
    # warm-up: allocator, thread pool, first-call paths, and oneDNN's kernels: it compiles
    # (JIT) one per new problem shape, and an expert's row count (padded to a multiple of
    # 32, ops/gemm.py) changes with every batch, so a MoE step settles only after ~100
    # steps. Measured on `tiny` at 2 threads with strace (executable mappings, i.e. newly
    # compiled kernels, per 30 steps): 1051, 170, 10, 9, then none from step 120; the
    # dense twin compiles none after its first steps. Median step per 30 steps (MoE,
    # dense): 57.0/44.6, 53.8/43.5, 53.8/45.2, 53.4/45.0, then 51.3-52.7/44.3-45.8. A
    # training run pays that once (~100 of the default 1200 steps); --warmup 2 shows the
    # cold start.
    for step in steps.values():
        for _ in range(args.warmup):
            step(batch())
    names = list(steps)
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    tokens = args.steps * args.batch * args.seq
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.steps):
                steps[name](batch())
            wall[name].append(tokens / (time.perf_counter() - t0))
            cpu[name].append(tokens / (time.process_time() - c0))
    return wall, cpu


def report(tps: dict[str, list[float]], clock: str) -> None:
    med = {n: statistics.median(v) for n, v in tps.items()}
    print(f"\n  tokens per {clock} second")
    print(f"  {'model':32s} {'median tok/s':>13s} {'min':>9s} {'max':>9s}")
    for n, v in tps.items():
        print(f"  {n:32s} {med[n]:13.0f} {min(v):9.0f} {max(v):9.0f}")
    names = list(med)
    moe, dense = med[names[0]], med[names[1]]
    print(f"\n  MoE / dense   = {moe / dense:.3f}   (target >= 0.85)")
    if len(names) > 2:
        print(f"  MoE / HF      = {moe / med[names[2]]:.2f}x  (target >= 2)")


def _time(fn: Callable[[], None], reps: int) -> tuple[float, float]:
    """Median (wall ms, process-CPU ms) of fn."""
    fn()
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3


def breakdown(args) -> None:
    """fwd+bwd milliseconds of one block's parts at T = batch·seq tokens: where the
    MoE/dense gap comes from (the attention is the same module in both models)."""
    torch.manual_seed(0)
    seq_cfg = dict(max_seq_len=max(args.seq, 256))
    tiny = MoELM(get_preset("tiny", args.vocab).replace(**seq_cfg))
    dense = MoELM(get_preset("dense", args.vocab).replace(**seq_cfg))
    D = tiny.cfg.d_model
    x = torch.randn(args.batch, args.seq, D, requires_grad=True)
    x_TD = x.detach().view(-1, D).requires_grad_()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    rope = tiny.rope(0, args.seq)
    moe = tiny.layers[0].ffn
    with torch.no_grad():
        routing = moe.router(x_TD)
        plan = moe.dispatch(routing, moe.cfg)

    def fb(f):
        return lambda: f().sum().backward()

    parts = {
        "attention (both)": fb(lambda: tiny.layers[0].attn(x, rope)),
        "rmsnorm (both)": fb(lambda: tiny.layers[0].attn_norm(x)),
        "dense FFN (dense)": fb(lambda: dense.layers[0].ffn(x).y),
        "MoE FFN (tiny), whole layer": fb(lambda: moe(x, token_ids=ids).y),
        "  router fwd+bwd": fb(lambda: moe.router(x_TD).weights_TK),
        "  dispatch (fwd)": lambda: moe.dispatch(routing, moe.cfg),
        "  experts, grouped backend": fb(lambda: moe.experts(x_TD, plan)),
        "  experts, loop backend": fb(lambda: moe.experts(x_TD, plan, backend="loop")),
        "  balance losses + stats (fwd)": lambda: moe._balance_losses(routing, x.shape[:-1], None),
        "embed+head+loss (both)": fb(lambda: lm_loss(tiny.head(tiny.norm(tiny.embed(ids))), ids)),
    }
    if args.hf != "none":
        hf = build_hf(args.hf, tiny.cfg, args.hf_experts)
        hf_layer = hf.model.layers[0]
        parts[f"HF {args.hf} MoE block"] = fb(lambda: hf_layer.mlp(x))
        parts[f"HF {args.hf} attention"] = fb(lambda: _hf_attention(hf, x))
    print(f"\n  fwd+bwd per part, T={args.batch * args.seq} tokens, median of {args.reps}:")
    print(f"  {'part':34s} {'wall ms':>9s} {'CPU ms':>9s}")
    for name, fn in parts.items():
        w, c = _time(fn, args.reps)
        print(f"  {name:34s} {w:9.2f} {c:9.2f}")


def _hf_attention(hf, x_BSD):
    B, S, _ = x_BSD.shape
    pos = torch.arange(S)[None].expand(B, S)
    cos_sin = hf.model.rotary_emb(x_BSD, pos)
    return hf.model.layers[0].self_attn(x_BSD, position_embeddings=cos_sin, attention_mask=None)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--vocab", type=int, default=260)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    p.add_argument("--warmup", type=int, default=100, help="untimed steps per model before the rounds")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hf", choices=["mixtral", "qwen3", "none"], default="mixtral")
    p.add_argument("--hf-experts", default=None, help="transformers experts_implementation "
                   "(default: its own default, grouped_mm); e.g. eager, batched_mm")
    p.add_argument("--breakdown", action="store_true", help="also time each block part")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--glibc-heap", action="store_true", help="keep glibc's default malloc thresholds "
                   "(moekit train sets them, training/heap.py; this run then sets them for no model)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    kept = False if args.glibc_heap else keep_freed_memory()  # process-wide: every model alike
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} x seq {args.seq}, "
          f"freed memory kept (training/heap.py): {kept}")
    wall, cpu = run_rounds(build_all(args), args)
    report(wall, "wall-clock")
    report(cpu, "process CPU")
    if args.breakdown:
        breakdown(args)


if __name__ == "__main__":
    main()

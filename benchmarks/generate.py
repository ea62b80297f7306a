"""Decode speed: moekit vs transformers' generate on the same Qwen3-MoE-shaped checkpoint.

    python benchmarks/generate.py                      # ~240M params, fp32, CPU
    python benchmarks/generate.py --layers 4 --new 16  # quicker
    python benchmarks/generate.py --threads 1          # on a shared machine (see below)

One random Qwen3-MoE model (hidden 512, 8 layers, 8 q heads of 128 (head_dim != d/h),
2 kv heads, 64 experts of 256, top-8, vocab 32000) is built by transformers, saved with
save_pretrained and loaded by moekit.from_pretrained, so both run the same weights.
Greedy decoding, batch 1 and 8, prompt of --prompt tokens. Decode tokens/s counts
generated tokens only: a forward hook on the model stamps the end of every forward,
the step time is the median gap between consecutive decode forwards (so it includes
each library's per-step generate overhead, excludes the prefill, and shrugs off the
bursts of a shared machine), and tokens/s = batch / step time. The libraries take turns
(--repeats rounds of one generate each), so drift in load or memory bandwidth hits both. Also reports whether
the greedy tokens agree (batch 1).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def build(args, folder: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(
        "qwen3_moe", hidden_size=512, num_hidden_layers=args.layers, num_attention_heads=8,
        num_key_value_heads=2, head_dim=128, intermediate_size=1536, moe_intermediate_size=256,
        num_experts=64, num_experts_per_tok=8, norm_topk_prob=True, vocab_size=32000,
        max_position_embeddings=4096, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # HF init leaves norms at 1 and routers near-uniform: spread them
        for p in hf.parameters():
            p.normal_(0, 0.05) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    hf.save_pretrained(folder)
    return hf


@torch.no_grad()
def decode_tps(runs: dict, prompt, new: int, repeats: int) -> dict[str, float]:
    """tokens/s per library; repeats interleave the libraries (A B A B ...) so that drift
    in a shared machine's load or memory bandwidth hits both alike."""
    gaps: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (model, run) in runs.items():
            stamps: list[float] = []
            hook = model.register_forward_hook(lambda *a, s=stamps: s.append(time.perf_counter()))
            try:
                run(prompt, new)
            finally:
                hook.remove()
            gaps[name] += [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]  # decode steps only
    return {name: prompt.shape[0] / statistics.median(g) for name, g in gaps.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import moekit
    from moekit.inference.generate import generate

    with tempfile.TemporaryDirectory() as folder:
        hf = build(args, folder)
        mk = moekit.from_pretrained(folder)
    n_params = sum(p.numel() for p in hf.parameters())
    print(f"Qwen3-MoE-shaped, {n_params / 1e6:.0f}M params, {args.layers} layers, fp32, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")

    def run_hf(ids, n):
        return hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def run_mk(ids, n):
        return generate(mk, ids, n, temperature=0.0)

    print(f"{'batch':>5} {'transformers tok/s':>19} {'moekit tok/s':>13} {'speedup':>8}")
    for b in args.batches:
        prompt = torch.randint(0, 32000, (b, args.prompt), generator=torch.Generator().manual_seed(b))
        tps = decode_tps({"hf": (hf, run_hf), "mk": (mk, run_mk)}, prompt, args.new, args.repeats)
        t_hf, t_mk = tps["hf"], tps["mk"]
        print(f"{b:>5} {t_hf:>19.1f} {t_mk:>13.1f} {t_mk / t_hf:>7.2f}x")
    prompt = torch.randint(0, 32000, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    same = torch.equal(run_hf(prompt, args.new), run_mk(prompt, args.new))
    print(f"greedy tokens identical (batch 1, {args.new} new): {same}")


if __name__ == "__main__":
    main()

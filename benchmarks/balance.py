"""Load balancing compared: one small MoE layer trained on the same clustered task with

  (a) none     topk_softmax, no balancing
  (b) switch   topk_softmax + Switch aux loss 0.01 (Fedus et al. 2021 eq. 4)
  (c) bias     topk_sigmoid + aux-loss-free bias update (DeepSeek-V3 eq. 16), once per step
  (d) ec       expert choice (Zhou et al. 2022): balanced by construction
  (e) noisy    noisy top-k + CV² importance/load loss 0.1 (Shazeer et al. 2017)

Task: inputs from a mixture of Gaussian clusters, each cluster with its own random linear
target map; the layer regresses the target (MSE). Cluster frequencies are Zipf-skewed
(p_c ∝ 1/(c+1)), so an unbalanced router has a reason to overload a few experts.
Token-choice runs use capacity dispatch (capacity_factor 1.25), expert choice the same
capacity factor for its C, so every run has the same compute budget.

Per run, over the last 10% of steps: max/mean expert load and the coefficient of variation
(CV = std/mean, population) of the slots each expert was asked for, dead experts (no
kept token), drop fraction (token-choice) and unrouted fraction (tokens no expert took);
and the final MSE on a held-out batch in eval mode. Plots load CV per step to --out.

    python benchmarks/balance.py                  # about a minute on 1 core
    python benchmarks/balance.py --steps 200 --out runs/balance.png
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time

import torch

from moekit import MoEConfig, MoELayer
from moekit.moe.balance import LoadAccumulator


@dataclasses.dataclass(frozen=True)
class Task:
    centers_CD: torch.Tensor
    maps_CDD: torch.Tensor
    probs_C: torch.Tensor

    @staticmethod
    def make(d: int, clusters: int, seed: int) -> Task:
        g = torch.Generator().manual_seed(seed)
        probs_C = 1.0 / torch.arange(1, clusters + 1, dtype=torch.float32)
        return Task(torch.randn(clusters, d, generator=g) * 2.0,
                    torch.randn(clusters, d, d, generator=g) / d**0.5,
                    probs_C / probs_C.sum())

    def batch(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        c_T = torch.multinomial(self.probs_C, n, replacement=True, generator=g)
        x_TD = self.centers_CD[c_T] + 0.5 * torch.randn(n, self.centers_CD.shape[1], generator=g)
        y_TD = torch.einsum("tij,tj->ti", self.maps_CDD[c_T], x_TD)
        return x_TD, y_TD


def configs(base: MoEConfig, bias_rate: float) -> dict[str, MoEConfig]:
    return {
        "none": base,
        "switch": base.replace(aux_loss_coef=0.01),
        "bias": base.replace(router="topk_sigmoid", bias_update_rate=bias_rate),
        "ec": base.replace(router="expert_choice", dispatch="dropless"),
        "noisy": base.replace(router="noisy_topk", cv2_loss_coef=0.1),
    }


def cv(load_E: torch.Tensor) -> float:
    load_E = load_E.float()
    return float(load_E.std(unbiased=False) / load_E.mean().clamp(min=1e-9))


def train(cfg: MoEConfig, task: Task, steps: int, batch: int, lr: float, seed: int) -> dict:
    torch.manual_seed(seed)
    layer = MoELayer(cfg)
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    acc = LoadAccumulator()
    g = torch.Generator().manual_seed(seed + 1)
    cvs, tail = [], []
    for step in range(steps):
        x, y = task.batch(batch, g)
        out = layer(x)
        loss = (out.y - y).square().mean() + out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cfg.router == "topk_sigmoid":
            acc.add(out.stats)
            acc.step(layer)  # once per optimizer step (DeepSeek-V3 §2.1.2)
        cvs.append(cv(out.stats.requested_per_expert))
        if step >= steps - max(1, steps // 10):
            tail.append(out.stats)
    return {"cv_steps": cvs, "tail": tail, "eval_mse": eval_mse(layer, task, seed)}


@torch.no_grad()
def eval_mse(layer: MoELayer, task: Task, seed: int) -> float:
    layer.eval()
    x, y = task.batch(4096, torch.Generator().manual_seed(seed + 99))
    return float((layer(x).y - y).square().mean())


def summarize(res: dict) -> dict[str, float]:
    tail = res["tail"]
    req_E = torch.stack([s.requested_per_expert.float() for s in tail]).sum(0)
    mean = lambda name: float(torch.stack([getattr(s, name).float() for s in tail]).mean())  # noqa: E731
    return {
        "max/mean": float(req_E.max() / req_E.mean()),
        "load CV": sum(cv(s.requested_per_expert) for s in tail) / len(tail),
        "dead": mean("dead_experts"),
        "drop": mean("drop_fraction"),
        "unrouted": mean("unrouted_fraction"),
        "eval MSE": res["eval_mse"],
    }


def plot(results: dict[str, dict], out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, res in results.items():
        ax.plot(res["cv_steps"], label=name, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("load CV (std/mean of slots per expert)")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_title("Expert load balance during training")
    ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--clusters", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--bias-rate", type=float, default=1e-2,
                   help="γ of the bias update (DeepSeek-V3 uses 1e-3 over far more steps)")
    p.add_argument("--threads", type=int, default=1, help="matrices this small gain nothing from more")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/balance.png"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    task = Task.make(a.d_model, a.clusters, a.seed)
    base = MoEConfig(d_model=a.d_model, num_experts=a.experts, top_k=a.top_k, d_ff=2 * a.d_model,
                     dispatch="capacity", capacity_factor=1.25)
    results, rows = {}, []
    for name, cfg in configs(base, a.bias_rate).items():
        t0 = time.perf_counter()
        results[name] = train(cfg, task, a.steps, a.batch, a.lr, a.seed)
        rows.append((name, summarize(results[name]), time.perf_counter() - t0))
    cols = list(rows[0][1])
    print(f"{a.steps} steps x {a.batch} tokens, E={a.experts}, k={a.top_k}, d={a.d_model}, "
          f"capacity_factor=1.25; load stats over the last {max(1, a.steps // 10)} steps")
    print(f"{'run':8s}" + "".join(f"{c:>10s}" for c in cols) + f"{'time s':>9s}")
    for name, s, dt in rows:
        print(f"{name:8s}" + "".join(f"{s[c]:10.4f}" for c in cols) + f"{dt:9.1f}")
    plot(results, a.out)
    print(f"plot: {a.out}")


if __name__ == "__main__":
    main()

"""Plots of a run folder (matplotlib, Agg backend): loss curves and expert load."""

from __future__ import annotations

from pathlib import Path

from moekit.training.metrics import read_metrics


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_line_figure(plt, fig, ax, path: Path) -> Path:
    """The common finish of a line plot: grid, legend, tight layout, PNG, close."""
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` points (a readable train curve; val is plotted raw)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_losses(records: list[dict], path: Path, title: str = "") -> Path:
    plt = _pyplot()
    train = [r for r in records if r["kind"] == "train" and not r.get("skipped")]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot([r["step"] for r in train], smooth([r["loss"] for r in train], 20),
                label="train (mean of 20 steps)", lw=1.2)
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation")
    ax.set(xlabel="optimizer step", ylabel="loss (nats/token)", title=title or "loss")
    return save_line_figure(plt, fig, ax, path)


def plot_load_heatmap(load_LE: list[list[float]], path: Path, title: str = "") -> Path:
    """Share of routed slots per expert (columns) in each MoE layer (rows); 1/E is balanced."""
    plt = _pyplot()
    L, E = len(load_LE), len(load_LE[0])
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * E + 2), max(2.5, 0.5 * L + 1.5)))
    im = ax.imshow(load_LE, cmap="viridis", aspect="auto", vmin=0)
    ax.set(xlabel="expert", ylabel="MoE layer", title=title or f"expert load (balanced = {1 / E:.3f})")
    ax.set_xticks(range(E) if E <= 32 else range(0, E, max(1, E // 16)))
    ax.set_yticks(range(L))
    fig.colorbar(im, ax=ax, label="share of routed slots")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(run_dir: str | Path) -> list[Path]:
    """loss.png, and expert_load.png from the last eval that logged loads (MoE runs)."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    if not records:
        raise ValueError(f"{str(run_dir)!r} has no metrics.jsonl records to plot")
    paths = [plot_losses(records, run_dir / "loss.png", title=run_dir.name)]
    loads = [r for r in records if r["kind"] == "eval" and r.get("load")]
    if loads:
        last = loads[-1]
        paths.append(plot_load_heatmap(last["load"], run_dir / "expert_load.png",
                                       title=f"expert load since the previous eval (step {last['step']})"))
    return paths

"""MoE vs dense at equal training compute: a markdown report and a PNG of both curves.

Each run's validation loss is read against training FLOPs (metrics.jsonl `flops`, see
training/loop.py: 6·N_active + attention per token). Two numbers answer "does MoE pay
off here": the loss each model reaches at the same FLOPs, and the FLOPs each needs to
reach the dense model's final loss (linear interpolation between evaluations).
"""

from __future__ import annotations

import json
from pathlib import Path

from moekit.training.metrics import read_metrics


def val_curve(run_dir: str | Path) -> tuple[list[float], list[float]]:
    evals = [r for r in read_metrics(run_dir) if r["kind"] == "eval"]
    return [r["flops"] for r in evals], [r["val_loss"] for r in evals]


def interpolate(xs: list[float], ys: list[float], x: float) -> float | None:
    """y at x on the piecewise-linear curve; None outside [xs[0], xs[-1]]."""
    for (x0, y0), (x1, y1) in zip(zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True), strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1] if xs and abs(x - xs[-1]) <= 1e-9 * max(1.0, x) else None


def flops_to_reach(xs: list[float], ys: list[float], target: float) -> float | None:
    """First FLOPs at which the (interpolated) loss is <= target; None if never."""
    if ys and ys[0] <= target:
        return xs[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys, strict=True), zip(xs[1:], ys[1:], strict=True), strict=False):
        if y1 <= target:
            return x1 if y0 == y1 else x0 + (x1 - x0) * (y0 - target) / (y0 - y1)
    return None


def _run_row(label: str, run_dir: Path) -> dict:
    meta = json.loads((run_dir / "run.json").read_text())
    xs, ys = val_curve(run_dir)
    train = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    return {"label": label, "dir": run_dir, "preset": meta["train"]["preset"], "xs": xs, "ys": ys,
            "steps": meta["train"]["steps"], "params": meta.get("params"), "active": meta.get("active_params"),
            "tokens_per_s": sorted(r["tokens_per_s"] for r in train)[len(train) // 2] if train else None}


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "n/a" if x is None else format(x, spec)


def complete_runs(budget_dirs: dict[float, Path], target: float) -> dict:
    """MoE runs that each ran their own whole schedule, at fractions of the budget: their
    final losses, and the FLOPs at which that (FLOPs, final loss) line reaches target.
    If even the smallest run is at or below target, that run's FLOPs is an upper bound."""
    runs = []
    for f, d in sorted(budget_dirs.items()):
        xs, ys = val_curve(d)
        runs.append({"fraction": f, "flops": xs[-1], "final_val": ys[-1]})
    xs, ys = [r["flops"] for r in runs], [r["final_val"] for r in runs]
    return {"moe_complete_runs": runs,
            "moe_flops_to_dense_final_complete": flops_to_reach(xs, ys, target),
            "moe_complete_is_upper_bound": bool(ys) and ys[0] <= target}


def write_report(out_dir: str | Path, moe_dir: str | Path, dense_dir: str | Path,
                 budget_dirs: dict[float, Path] | None = None) -> dict:
    """report.md and compare.png in out_dir; returns the headline numbers. budget_dirs
    (fraction -> run folder, 1.0 the main MoE run) adds the complete shorter MoE runs."""
    out_dir = Path(out_dir)
    moe, dense = _run_row("MoE", Path(moe_dir)), _run_row("dense", Path(dense_dir))
    budget = min(moe["xs"][-1], dense["xs"][-1])
    target = dense["ys"][-1]
    numbers = {
        "budget_flops": budget,
        "moe_val_at_budget": interpolate(moe["xs"], moe["ys"], budget),
        "dense_val_at_budget": interpolate(dense["xs"], dense["ys"], budget),
        "dense_final_val": target,
        "moe_flops_to_dense_final": flops_to_reach(moe["xs"], moe["ys"], target),
        "dense_flops_to_dense_final": flops_to_reach(dense["xs"], dense["ys"], target),
    }
    if budget_dirs and len(budget_dirs) > 1:
        numbers.update(complete_runs({f: Path(d) for f, d in budget_dirs.items()}, target))
    png = _plot(out_dir / "compare.png", [moe, dense], target, numbers.get("moe_complete_runs"))
    (out_dir / "report.md").write_text(_markdown(moe, dense, numbers, png))
    (out_dir / "report.json").write_text(json.dumps(numbers, indent=1))
    return numbers


def _markdown(moe: dict, dense: dict, n: dict, png: Path | None) -> str:
    ratio = (n["moe_flops_to_dense_final"] / n["dense_flops_to_dense_final"]
             if n["moe_flops_to_dense_final"] and n["dense_flops_to_dense_final"] else None)
    rows = "\n".join(
        f"| {r['label']} ({r['preset']}) | {r['params'] or 'n/a':,} | {r['active'] or 'n/a':,} | {r['steps']} "
        f"| {r['xs'][-1]:.3e} | {r['ys'][-1]:.4f} | {_fmt(r['tokens_per_s'], ',.0f')} |"
        for r in (moe, dense))
    lines = [
        "# MoE vs dense at equal training compute", "",
        "| model | params | active params | steps | training FLOPs | final val loss | tokens/s (median) |",
        "|---|---|---|---|---|---|---|", rows, "",
        f"- validation loss at equal training FLOPs ({n['budget_flops']:.3e}): "
        f"MoE {_fmt(n['moe_val_at_budget'])}, dense {_fmt(n['dense_val_at_budget'])} (nats/token)",
        f"- FLOPs to reach the dense model's final loss ({n['dense_final_val']:.4f}): "
        f"MoE {_fmt(n['moe_flops_to_dense_final'], '.3e')}, dense {_fmt(n['dense_flops_to_dense_final'], '.3e')}"
        + (f" (MoE needs {ratio:.0%} of the dense FLOPs)" if ratio else " (MoE did not reach it)"),
        "- FLOPs per token = 6 x active matmul parameters + attention (training/loop.py); wall-clock "
        "speed is a separate question (see tokens/s).",
    ]
    if "moe_complete_runs" in n:
        got, dense_flops = n["moe_flops_to_dense_final_complete"], n["dense_flops_to_dense_final"]
        share = (f"{'at most ' if n['moe_complete_is_upper_bound'] else ''}{got / dense_flops:.0%} of the dense FLOPs"
                 if got and dense_flops else "not reached")
        lines += ["", "MoE runs that each ran a whole schedule (warmup + cosine) at a fraction of the budget; "
                  "the curve above reads the full run mid-schedule, at a higher learning rate:", "",
                  "| fraction | training FLOPs | final val loss |", "|---|---|---|"]
        lines += [f"| {r['fraction']:g} | {r['flops']:.3e} | {r['final_val']:.4f} |" for r in n["moe_complete_runs"]]
        lines += ["", f"- from these runs, FLOPs for MoE to reach the dense model's final loss: "
                  f"{_fmt(got, '.3e')} ({share})"]
    if png is not None:
        lines += ["", f"![validation loss vs training FLOPs]({png.name})"]
    return "\n".join(lines) + "\n"


def _plot(path: Path, runs: list[dict], target: float, complete: list[dict] | None = None) -> Path | None:
    try:
        from moekit.analysis.plots import _pyplot, save_line_figure

        plt = _pyplot()
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in runs:
        ax.plot(r["xs"], r["ys"], "o-", label=f"{r['label']} ({r['preset']})")
    if complete:
        ax.plot([r["flops"] for r in complete], [r["final_val"] for r in complete], "k*", ms=10,
                label="MoE, whole schedule per budget")
    ax.axhline(target, color="gray", ls="--", lw=0.8, label="dense final loss")
    ax.set(xlabel="training FLOPs", ylabel="validation loss (nats/token)",
           title="MoE vs dense at equal compute")
    return save_line_figure(plt, fig, ax, path)

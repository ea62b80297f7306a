"""`moekit compare`: MoE preset vs dense preset at equal training FLOPs, with a report."""

from __future__ import annotations

import typer

from moekit.cli.train import build_config, fail


def parse_budgets(text: str) -> tuple[float, ...]:
    try:
        fs = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        fs = ()
    if not fs or any(not 0 < f <= 1 for f in fs):
        raise ValueError(f"--budgets={text!r} is invalid: expected fractions in (0, 1], e.g. 0.5,1")
    return fs


def compare_command(
    moe: str = typer.Option("tiny", help="MoE preset"),
    dense: str = typer.Option("dense", help="dense preset"),
    out: str = typer.Option("runs/compare", help="folder for both runs and report.md / compare.png"),
    data: str = typer.Option(None, help="a text file or folder (default: the Python stdlib source)"),
    config: str = typer.Option(None, "--config", help="TOML file of train settings shared by both runs"),
    set_: list[str] = typer.Option(None, "--set", help="override shared settings, e.g. --set steps=300"),
    budgets: str = typer.Option("1", help="fractions of the steps at which to train extra MoE runs, each "
                                "with its own full schedule, e.g. 0.25,0.5,1 (see report.md)"),
) -> None:
    """Train both presets with the same settings and compute budget; write report.md."""
    from moekit.training.compare import compare

    try:
        cfg = build_config(moe, config, set_ or [], data, None, resume=False)
        numbers = compare(cfg, out, moe_preset=moe, dense_preset=dense, budgets=parse_budgets(budgets))
    except ValueError as e:
        fail(str(e))
    typer.echo(f"report: {out}/report.md")
    for k, v in numbers.items():
        typer.echo(f"  {k}: {v}")

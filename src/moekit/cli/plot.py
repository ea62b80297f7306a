"""`moekit plot RUN`: loss curves and the expert-load heatmap as PNGs in the run folder."""

from __future__ import annotations

import typer

from moekit.cli.train import fail


def plot_command(run: str = typer.Argument(..., help="run folder written by `moekit train`")) -> None:
    """Write loss.png and expert_load.png into RUN."""
    try:
        from moekit.analysis.plots import plot_run

        paths = plot_run(run)
    except ImportError:
        fail("plotting needs matplotlib: pip install 'moekit[plot]'")
    except ValueError as e:
        fail(str(e))
    for p in paths:
        typer.echo(str(p))

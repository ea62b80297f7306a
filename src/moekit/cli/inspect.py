"""`moekit inspect CONFIG_OR_FOLDER`: parameter accounting from config.json alone."""

from __future__ import annotations

import json

import typer


def inspect(
    path: str = typer.Argument(..., help="config.json, or a folder holding one"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    context: int = typer.Option(4096, help="context length for attention FLOPs per token"),
) -> None:
    """Total and active parameters, expert split, weight memory and FLOPs per token,
    counted from the config (no weights are read)."""
    from moekit.models.accounting import count_parameters, format_report, load_config

    try:
        report = count_parameters(load_config(path), context_len=context)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else format_report(report))

"""`moekit convert SRC DST`: an HF checkpoint folder through moekit (validated, re-typed, re-sharded)."""

from __future__ import annotations

import typer


def convert(
    src: str = typer.Argument(..., help="HF checkpoint folder (config.json + safetensors)"),
    dst: str = typer.Argument(..., help="output folder (HF layout, loads in transformers)"),
    dtype: str = typer.Option("keep", help="keep, bf16, fp16, fp32"),
    max_shard_gb: float = typer.Option(4.0, help="largest safetensors shard, in GiB"),
) -> None:
    """Load every tensor into moekit's model, then write the HF layout back."""
    from moekit.models.hf.convert import convert_hf

    try:
        info = convert_hf(src, dst, dtype, int(max_shard_gb * 2**30))
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {dst}: {info['family']}, {info['parameters']:,} parameters, {info['dtype']}")

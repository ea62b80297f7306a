"""The `moekit` command. Each subcommand parses, builds a config, calls one library function."""

from __future__ import annotations

import typer

app = typer.Typer(help="moekit: Mixture-of-Experts toolkit for PyTorch.", no_args_is_help=True,
                  add_completion=False)


@app.command()
def demo(
    tokens: int = typer.Option(2048, help="tokens per batch"),
    steps: int = typer.Option(3, help="timed forward+backward steps"),
    router: str = typer.Option("topk_softmax", help="router name"),
) -> None:
    """Build one MoE layer, run forward+backward, print routing stats and a check
    against the loop oracle."""
    from moekit.analysis.demo import layer_demo

    layer_demo(tokens=tokens, steps=steps, router=router)


from moekit.cli.inspect import inspect as _inspect  # noqa: E402

app.command(name="inspect")(_inspect)


def main() -> None:  # pragma: no cover
    app()

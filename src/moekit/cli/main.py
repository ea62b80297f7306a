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

from moekit.cli.convert import convert as _convert  # noqa: E402

app.command(name="convert")(_convert)

from moekit.cli.compare import compare_command as _compare  # noqa: E402
from moekit.cli.generate import generate_command as _generate  # noqa: E402
from moekit.cli.plot import plot_command as _plot  # noqa: E402
from moekit.cli.train import train_command as _train  # noqa: E402

app.command(name="train")(_train)
app.command(name="generate")(_generate)
app.command(name="plot")(_plot)
app.command(name="compare")(_compare)

from moekit.cli.plan import plan_command as _plan  # noqa: E402

app.command(name="plan")(_plan)


def main() -> None:  # pragma: no cover
    app()

"""`moekit train`: build a TrainConfig from defaults, --config, --preset/--data/--out and
--set, then call moekit.training.train."""

from __future__ import annotations

import json
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

import typer

from moekit.training.config import TrainConfig, apply_overrides, merge_dicts


def fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)


def build_config(preset: str | None, config: Path | None, sets: list[str], data: str | None,
                 out: str | None, resume: bool) -> TrainConfig:
    """defaults < saved run (--resume) < --config < --preset/--data/--out < --set."""
    d = TrainConfig().to_dict()
    if resume:
        if out is None:
            raise ValueError("--resume needs --out DIR: the run folder to continue")
        run_file = Path(out) / "run.json"
        if not run_file.is_file():
            raise ValueError(f"--resume: {out!r} holds no run (run.json is missing)")
        d = json.loads(run_file.read_text())["train"]
    if config is not None:
        try:
            d = merge_dicts(d, tomllib.loads(Path(config).read_text()))
        except FileNotFoundError:
            raise ValueError(f"--config {str(config)!r} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"--config {str(config)!r} is not valid TOML: {e}") from None
    d = _apply_flags(d, preset, data, out)
    return TrainConfig.from_dict(apply_overrides(d, sets))


def _apply_flags(d: dict, preset: str | None, data: str | None, out: str | None) -> dict:
    d = dict(d)
    if preset is not None:
        from moekit.models import PRESETS

        PRESETS.get(preset)  # an unknown name lists the valid ones
        d["preset"] = preset
    if data is not None:
        path = Path(data)
        if not path.exists():
            raise ValueError(f"--data {data!r} does not exist; pass a text file or a folder of text files")
        d["data"] = dict(d.get("data", {}), path=str(path.resolve()))
    if out is not None:
        d["out_dir"] = out
    return d


def train_command(
    preset: str = typer.Option(None, help="model preset: tiny (default), dense, micro, micro-dense, mixtral-like, "
                               "deepseek-like"),
    config: Path = typer.Option(None, "--config", help="TOML file: top-level train keys and the tables data and model"),
    set_: list[str] = typer.Option(None, "--set", help="override: --set steps=100 --set data.tokenizer=bpe "
                                   "--set model.moe.top_k=1 (repeatable)"),
    data: str = typer.Option(None, help="a text file or folder (default: the Python stdlib source)"),
    out: str = typer.Option(None, help="run folder (default: runs/<preset>-<time>)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
    ep: int = typer.Option(0, "--ep", help="expert-parallel size under torchrun (0: single process)"),
) -> None:
    """Train a language model (the default: the `tiny` MoE on the Python stdlib source)."""
    from moekit.training import NonFiniteLossError, train

    try:
        cfg = build_config(preset, config, set_ or [], data, out, resume)
        train(cfg, resume=resume, ep=ep)
    except ValueError as e:
        fail(str(e))
    except NonFiniteLossError as e:
        typer.secho(f"training stopped: {e}", fg="red", err=True)
        raise typer.Exit(1) from None

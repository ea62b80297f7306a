"""Where training numbers go: metrics.jsonl (always), TensorBoard (if installed), and a
rich progress bar with tokens/s, loss and a one-line expert-load summary."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

METRICS = "metrics.jsonl"


def load_summary(loads_LE: torch.Tensor | None) -> dict:
    """max/mean load (1.0 = perfectly balanced, E = one expert takes everything) over all
    MoE layers, and experts that received no token in the batch."""
    if loads_LE is None:
        return {}
    loads_LE = loads_LE.double()
    mean_L = loads_LE.mean(-1).clamp(min=1e-9)
    return {"load_max_over_mean": round(float((loads_LE.max(-1).values / mean_L).max()), 4),
            "dead_experts": int((loads_LE == 0).sum())}


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: str | Path, last_step: int) -> None:
    """On resume, drop what the interrupted run logged after its last checkpoint."""
    keep = [r for r in read_metrics(run_dir) if r["step"] <= last_step]
    path = Path(run_dir) / METRICS
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
    tmp.replace(path)


class Reporter:
    """Writes every record to metrics.jsonl; prints a line every log_every steps."""

    def __init__(self, run_dir: Path, total_steps: int, log_every: int, console: Console | None = None,
                 start_step: int = 0) -> None:
        self.file = open(Path(run_dir) / METRICS, "a")  # noqa: SIM115 - closed in close()
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.log_every = log_every
        self.tb = _tensorboard(run_dir)
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), TextColumn("{task.description}"),
                                 console=self.console, transient=True,
                                 disable=not self.console.is_terminal)
        self.task = self.progress.add_task("", total=total_steps, completed=start_step)
        self.progress.start()

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def train(self, record: dict) -> None:
        self.write(record)
        line = (f"loss {record['loss']:.4f} | {record['tokens_per_s']:,.0f} tok/s"
                + _load_text(record))
        self.progress.update(self.task, completed=record["step"], description=line)
        if record.get("skipped"):
            self.console.print(f"[yellow]warning: step {record['step']} skipped: non-finite loss "
                               f"or gradient (loss={record['loss']}, grad_norm={record['grad_norm']})")
        if record["step"] % self.log_every == 0:
            self.console.print(f"step {record['step']:>6} | lr {record['lr']:.2e} | {line}")

    def eval(self, record: dict) -> None:
        self.write(record)
        self.console.print(f"[bold]eval  {record['step']:>6} | val loss {record['val_loss']:.4f} "
                           f"| {record['val_bpb']:.3f} bits/byte")

    def close(self) -> None:
        self.progress.stop()
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _load_text(record: dict) -> str:
    if "load_max_over_mean" not in record:
        return ""
    return f" | load max/mean {record['load_max_over_mean']:.2f}, dead {record['dead_experts']}"


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional: pip install 'moekit[tensorboard]'
        return None
    return SummaryWriter(str(Path(run_dir) / "tb"))

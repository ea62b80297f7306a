"""The training loop: step, log, evaluate, checkpoint, in that order, until cfg.steps."""

from __future__ import annotations

import time
from pathlib import Path

from moekit.training.metrics import Reporter, load_summary
from moekit.training.trainer import Trainer

CHECKPOINTS = "checkpoints"


def train_flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token (Kaplan et al. 2020 §2.1, x3 for forward + backward):
    6 x active matmul parameters + 6 x layers x seq_len x attention width (causal, so the
    average token attends to seq_len/2 positions: 2·2·(S/2)·H·hd forward per layer)."""
    cfg = model.cfg
    matmul = model.num_active_parameters(exclude_embeddings=not cfg.tie_embeddings)
    attn = cfg.n_layers * seq_len * cfg.n_heads * cfg.head_size
    return 6.0 * matmul + 6.0 * attn


def fit(trainer: Trainer, run_dir: Path, reporter: Reporter, meta: dict) -> dict | None:
    """Train until cfg.steps; returns the last eval record (None if no eval ran)."""
    cfg = trainer.cfg
    flops_per_token = train_flops_per_token(trainer.model, cfg.seq_len)
    last_eval, loads_sum = None, None
    while trainer.step < cfg.steps:
        t0 = time.perf_counter()
        result = trainer.train_step()
        dt = time.perf_counter() - t0
        step = trainer.step
        if result.loads_LE is not None:
            loads_sum = result.loads_LE if loads_sum is None else loads_sum + result.loads_LE
        reporter.train({"kind": "train", "step": step, "loss": result.loss, "aux_loss": result.aux_loss,
                        "lr": trainer.lr_used, "grad_norm": result.grad_norm, "skipped": result.skipped,
                        "tokens": step * trainer.tokens_per_step,
                        "tokens_per_s": trainer.tokens_per_step / dt} | load_summary(result.loads_LE))
        if step % cfg.eval_every == 0 or step == cfg.steps:
            last_eval = eval_record(trainer, flops_per_token, loads_sum)
            reporter.eval(last_eval)
            loads_sum = None
        if step % cfg.save_every == 0 or step == cfg.steps:
            trainer.save(run_dir / CHECKPOINTS, meta)
    return last_eval


def eval_record(trainer: Trainer, flops_per_token: float, loads_sum) -> dict:
    val_loss = trainer.evaluate()
    tokens = trainer.step * trainer.tokens_per_step
    record = {"kind": "eval", "step": trainer.step, "val_loss": val_loss,
              "val_bpb": trainer.data.bits_per_byte(val_loss), "tokens": tokens,
              "flops": tokens * flops_per_token}
    if loads_sum is not None:  # layers x experts load fractions since the last eval
        record["load"] = (loads_sum.double() / loads_sum.sum(-1, keepdim=True).clamp(min=1)).tolist()
    return record

"""`moekit compare`: train an MoE preset and a dense preset at equal training compute.

Both runs share every TrainConfig field; the dense run's steps are scaled so that
steps x FLOPs/token match (they are equal for `tiny` vs `dense`, whose active
parameters match by construction).

`budgets` (fractions of the steps, e.g. (0.5, 1.0)) adds MoE runs that stop early, each
with its own complete warmup + cosine schedule. Reading "FLOPs to reach the dense
loss" off the full run's curve compares an MoE point taken mid-schedule, at a high
learning rate, with a dense loss taken after its schedule has annealed; the complete
shorter runs are the fair measurement (the usual one in scaling studies), and the
report gives both.
"""

from __future__ import annotations

import json
from pathlib import Path

from moekit.analysis.report import write_report
from moekit.models import MoELM
from moekit.training.config import TrainConfig
from moekit.training.loop import train_flops_per_token
from moekit.training.run import model_config, train


def compare(cfg: TrainConfig, out_dir: str | Path, moe_preset: str = "tiny",
            dense_preset: str = "dense", budgets: tuple[float, ...] = (1.0,)) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    moe_dir, dense_dir = out_dir / moe_preset, out_dir / dense_preset
    base = cfg.replace(sample_tokens=0)
    train(base.replace(preset=moe_preset, out_dir=str(moe_dir)))
    moe_meta = json.loads((moe_dir / "run.json").read_text())
    vocab = moe_meta["model"]["vocab_size"]
    dense_fpt = train_flops_per_token(MoELM(model_config(base.replace(preset=dense_preset), vocab)),
                                      cfg.seq_len)
    steps = max(1, round(cfg.steps * moe_meta["train_flops_per_token"] / dense_fpt))
    # evaluate at the same FLOPs as the MoE run, so the curves can be read side by side
    eval_every = max(1, round(cfg.eval_every * steps / cfg.steps))
    train(base.replace(preset=dense_preset, out_dir=str(dense_dir), steps=steps,
                       eval_every=eval_every, save_every=max(cfg.save_every, steps)))
    budget_dirs = {1.0: moe_dir}
    for f in sorted(set(budgets) - {1.0}):
        short = max(1, round(f * cfg.steps))
        budget_dirs[f] = out_dir / f"{moe_preset}@{f:g}"
        train(base.replace(preset=moe_preset, out_dir=str(budget_dirs[f]), steps=short,
                           warmup=min(cfg.warmup, short), eval_every=min(cfg.eval_every, short),
                           save_every=max(cfg.save_every, short)))
    return write_report(out_dir, moe_dir, dense_dir, budget_dirs)

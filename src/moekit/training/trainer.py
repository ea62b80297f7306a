"""Trainer: model, optimizer, batch sampler and counters; its state is one checkpoint.

The loop around it (logging, eval cadence, progress) lives in `training/loop.py`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moekit.data import BatchSampler, TokenData, eval_batches
from moekit.distributed import launch as ep_launch
from moekit.training import checkpoint as ckpt
from moekit.training.config import TrainConfig
from moekit.training.schedule import lr_at
from moekit.training.step import StepResult, build_optimizer, evaluate, train_step


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class Trainer:
    def __init__(self, cfg: TrainConfig, model, data: TokenData, device: torch.device) -> None:
        self.cfg, self.model, self.data, self.device = cfg, model, data, device
        self.optimizer = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sampler = BatchSampler(data.train_N, cfg.seq_len, cfg.seed)
        self.step = 0  # optimizer steps done (skipped ones included)
        self.bad_streak = 0
        self.lr_used = 0.0

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.cfg.seq_len

    def lr(self) -> float:
        c = self.cfg
        return lr_at(self.step, lr=c.lr, min_lr=c.min_lr, warmup=c.warmup, steps=c.steps)

    def next_micro_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One batch of batch_size windows, split into grad_accum equal micro-batches."""
        x_BS, y_BS = self.sampler.next_batch(self.cfg.batch_size)
        if ep_launch.is_distributed(self.model):  # each data-parallel rank takes its rows
            x_BS, y_BS = ep_launch.shard_rows(x_BS), ep_launch.shard_rows(y_BS)
        k = self.cfg.grad_accum
        return list(zip(x_BS.chunk(k), y_BS.chunk(k), strict=True))

    def train_step(self) -> StepResult:
        self.lr_used = self.lr()
        result = train_step(self.model, self.optimizer, self.next_micro_batches(), lr=self.lr_used,
                            grad_clip=self.cfg.grad_clip, device=self.device, dtype=self.cfg.dtype)
        self.step += 1
        self.bad_streak = self.bad_streak + 1 if result.skipped else 0
        if self.bad_streak >= self.cfg.max_bad_steps:
            raise NonFiniteLossError(
                f"{self.bad_streak} consecutive steps (up to step {self.step}) had a non-finite loss "
                f"or gradient (last: loss={result.loss}, grad_norm={result.grad_norm}); stopping. "
                f"Try a lower lr, grad_clip > 0, or dtype=float32.")
        return result

    def evaluate(self) -> float:
        batches = eval_batches(self.data.val_N, self.cfg.seq_len, self.cfg.eval_batches,
                               self.cfg.batch_size)
        return evaluate(self.model, batches, self.device, self.cfg.dtype)

    # ---- checkpoint state
    def param_names(self) -> list[str]:
        """Names in optimizer order (tied weights appear once, as in model.parameters())."""
        by_id = {id(p): n for n, p in reversed(list(self.model.named_parameters()))}
        return [by_id[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    def save(self, root: str | Path, meta: dict) -> Path:
        opt_t, opt_meta = ckpt.optimizer_to_flat(self.optimizer, self.param_names())
        rng_t, rng_meta = ckpt.rng_to_flat()
        data_state = self.sampler.state_dict()
        tensors = opt_t | rng_t | {"data/generator": data_state["generator"]}
        state = {"step": self.step, "bad_streak": self.bad_streak, "optimizer": opt_meta,
                 "rng": rng_meta, "data": {"batches_drawn": data_state["batches_drawn"]}} | meta
        if ep_launch.is_distributed(self.model):  # experts gathered under global ids, rank 0 writes
            return ep_launch.save_checkpoint(ckpt.save_checkpoint, root, self.step, self.model, tensors,
                                             state, self.cfg.keep_last)
        return ckpt.save_checkpoint(root, self.step, self.model, tensors, state, self.cfg.keep_last)

    def restore(self, path: str | Path) -> dict:
        if ep_launch.is_distributed(self.model):  # any saved EP size -> this rank's experts
            tensors, state = ep_launch.load_checkpoint(ckpt.load_checkpoint, path, self.model)
        else:
            tensors, state = ckpt.load_checkpoint(path, self.model)
        ckpt.optimizer_from_flat(self.optimizer, self.param_names(), tensors, state["optimizer"])
        ckpt.rng_from_flat(tensors, state["rng"])
        self.sampler.load_state_dict({"generator": tensors["data/generator"],
                                      "batches_drawn": state["data"]["batches_drawn"]})
        self.step, self.bad_streak = int(state["step"]), int(state["bad_streak"])
        return state

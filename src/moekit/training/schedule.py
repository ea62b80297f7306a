"""Learning rate: linear warmup, then cosine decay to min_lr (GPT-3 / Chinchilla recipe).

A pure function of the step, so the schedule's whole state is the step counter that
the checkpoint already holds.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, steps: int) -> float:
    """lr for optimizer step `step` (0-based)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))

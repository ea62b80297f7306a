"""Batches: random windows of seq_len+1 tokens from one token stream.

The sampler's whole position is the state of its own torch.Generator, so saving that
state in a checkpoint and restoring it gives the resumed run the very same batches.
Validation uses fixed, evenly spaced windows (no RNG), so every evaluation sees the same
tokens and eval never disturbs the training stream.
"""

from __future__ import annotations

import torch


def windows(tokens_N: torch.Tensor, starts_B: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets, both (B, S) int64."""
    idx_BS1 = starts_B[:, None] + torch.arange(seq_len + 1)
    chunk_BS1 = tokens_N[idx_BS1].long()
    return chunk_BS1[:, :-1], chunk_BS1[:, 1:]


def _check_length(tokens_N: torch.Tensor, seq_len: int, what: str) -> None:
    if tokens_N.numel() < seq_len + 2:
        raise ValueError(f"the {what} split has {tokens_N.numel()} tokens, fewer than "
                         f"seq_len+2={seq_len + 2}; use more data or a smaller seq_len")


class BatchSampler:
    def __init__(self, tokens_N: torch.Tensor, seq_len: int, seed: int) -> None:
        _check_length(tokens_N, seq_len, "train")
        self.tokens_N = tokens_N
        self.seq_len = seq_len
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0

    def next_batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        high = self.tokens_N.numel() - self.seq_len - 1
        starts_B = torch.randint(0, high + 1, (batch_size,), generator=self.generator)
        self.batches_drawn += 1
        return windows(self.tokens_N, starts_B, self.seq_len)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.batches_drawn = int(state["batches_drawn"])


def eval_batches(tokens_N: torch.Tensor, seq_len: int, num_batches: int, batch_size: int):
    """num_batches fixed batches of windows spread evenly over the whole stream."""
    _check_length(tokens_N, seq_len, "validation")
    high = tokens_N.numel() - seq_len - 1
    starts = torch.linspace(0, high, num_batches * batch_size).long()
    for b in range(num_batches):
        yield windows(tokens_N, starts[b * batch_size:(b + 1) * batch_size], seq_len)

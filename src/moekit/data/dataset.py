"""From a data config to token streams: corpus -> tokenizer -> train/val streams."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit.data.corpus import Corpus, path_corpus, stdlib_corpus
from moekit.data.tokenizer import TOKENIZERS, encode_docs


@dataclass(frozen=True)
class TokenData:
    tokenizer: object
    corpus: Corpus
    train_N: torch.Tensor  # int32 token stream
    val_N: torch.Tensor

    @property
    def val_tokens_per_byte(self) -> float:
        """Converts a loss in nats/token to bits/byte: bpb = loss / ln 2 * tokens/bytes."""
        return self.val_N.numel() / max(1, self.corpus.val_bytes)

    def bits_per_byte(self, loss_nats: float) -> float:
        return loss_nats / math.log(2) * self.val_tokens_per_byte


def load_corpus(path: str | None, max_bytes: int, val_fraction: float) -> Corpus:
    if path is None:
        return stdlib_corpus(max_bytes, val_fraction)
    return path_corpus(path, max_bytes, val_fraction)


def build_token_data(corpus: Corpus, tokenizer_name: str, vocab_size: int,
                     run_dir: str | Path | None = None, reuse: bool = False) -> TokenData:
    """Train the tokenizer on the train split (or reload it from run_dir when reuse)."""
    cls = TOKENIZERS.get(tokenizer_name)
    if reuse and run_dir is not None:
        tok = cls.load(run_dir)
    else:
        tok = cls.train(corpus.train_docs, vocab_size)
        if run_dir is not None:
            tok.save(run_dir)
    return TokenData(tok, corpus, encode_docs(tok, corpus.train_docs), encode_docs(tok, corpus.val_docs))


def unigram_bits_per_byte(docs) -> float:
    """Entropy (bits) of the byte distribution of docs: the loss of the best model that
    ignores context entirely, measured on the very text it is fitted to."""
    counts = torch.zeros(256, dtype=torch.float64)
    for d in docs:
        counts += torch.bincount(torch.frombuffer(bytearray(d), dtype=torch.uint8).long(),
                                 minlength=256).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log2()).sum())

"""Tokenizers, chosen by name: `byte` (default, nothing to train or save) and `bpe`
(byte-level BPE trained with the `tokenizers` package, saved as tokenizer.json in the
run folder and reloaded from there for generation).

Both map UTF-8 bytes to ids and back, so bits per byte (bpb) compares them fairly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moekit.registry import Registry

TOKENIZERS: Registry = Registry("tokenizer")
SPECIALS = ("<bos>", "<eos>", "<pad>")


@TOKENIZERS.register("byte")
class ByteTokenizer:
    """Ids 0..255 are the bytes; 256, 257, 258 are BOS, EOS, PAD."""

    name = "byte"
    vocab_size = 259
    bos_id, eos_id, pad_id = 256, 257, 258

    @classmethod
    def train(cls, docs, vocab_size: int) -> ByteTokenizer:  # noqa: ARG003 - nothing to learn
        return cls()

    @classmethod
    def load(cls, run_dir: str | Path) -> ByteTokenizer:  # noqa: ARG003
        return cls()

    def save(self, run_dir: str | Path) -> None:
        pass

    def encode(self, text: bytes) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(text, dtype=np.uint8).astype(np.int32))

    def decode(self, ids) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def encode_many(self, docs) -> list[torch.Tensor]:
        return [self.encode(d) for d in docs]


@TOKENIZERS.register("bpe")
class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenizer) from the `tokenizers` package."""

    name = "bpe"
    FILE = "tokenizer.json"

    def __init__(self, tok) -> None:
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.bos_id, self.eos_id, self.pad_id = (tok.token_to_id(s) for s in SPECIALS)

    @classmethod
    def train(cls, docs, vocab_size: int) -> BPETokenizer:
        tokenizers = _import_tokenizers()
        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator((d.decode("utf-8", errors="replace") for d in docs), trainer)
        return cls(tok)

    @classmethod
    def load(cls, run_dir: str | Path) -> BPETokenizer:
        path = Path(run_dir) / cls.FILE
        if not path.is_file():
            raise ValueError(f"run folder {str(run_dir)!r} has no {cls.FILE} for its bpe tokenizer")
        return cls(_import_tokenizers().Tokenizer.from_file(str(path)))

    def save(self, run_dir: str | Path) -> None:
        self.tok.save(str(Path(run_dir) / self.FILE))

    def encode(self, text: bytes) -> torch.Tensor:
        ids = self.tok.encode(text.decode("utf-8", errors="replace")).ids
        return torch.tensor(ids, dtype=torch.int32)

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def encode_many(self, docs) -> list[torch.Tensor]:
        """encode_batch runs on all cores in Rust (the whole stdlib in seconds)."""
        texts = [d.decode("utf-8", errors="replace") for d in docs]
        return [torch.tensor(e.ids, dtype=torch.int32) for e in self.tok.encode_batch(texts)]


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError:  # pragma: no cover - depends on the install
        raise ValueError("data.tokenizer='bpe' needs the `tokenizers` package: "
                         "pip install 'moekit[bpe]'") from None
    return tokenizers


def encode_docs(tokenizer, docs) -> torch.Tensor:
    """One int32 stream: each document followed by EOS (so a window can span documents,
    and the model learns where files end)."""
    eos = torch.tensor([tokenizer.eos_id], dtype=torch.int32)
    parts = []
    for ids in tokenizer.encode_many(docs):
        parts += [ids, eos]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int32)

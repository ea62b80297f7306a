"""Data: corpus determinism and split, tokenizers, batching."""

from __future__ import annotations

import math

import pytest
import torch

from moekit.data import (
    BatchSampler,
    ByteTokenizer,
    TokenData,
    build_token_data,
    encode_docs,
    eval_batches,
    path_corpus,
    stdlib_corpus,
    unigram_bits_per_byte,
    windows,
)
from moekit.data.corpus import is_val_path, split_corpus, stdlib_files


def test_stdlib_corpus_is_deterministic_and_capped():
    a, b = stdlib_corpus(max_bytes=400_000), stdlib_corpus(max_bytes=400_000)
    assert a.train_paths == b.train_paths and a.val_paths == b.val_paths
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    assert 0 < a.train_bytes + a.val_bytes <= 400_000 + 100  # + the tail split's joining newlines
    _, rels = stdlib_files(2_000_000)
    assert rels == sorted(rels) and len(rels) > 5
    assert not any("site-packages" in r or "/test/" in r or r.startswith("test/") for r in rels)


def test_stdlib_split_is_by_file_and_disjoint():
    c = stdlib_corpus(max_bytes=3_000_000)
    assert c.val_paths and c.train_paths
    assert not set(c.val_paths) & set(c.train_paths)
    assert all(is_val_path(p, 0.05) for p in c.val_paths)
    assert 0.005 < c.val_bytes / (c.val_bytes + c.train_bytes) < 0.3


def test_split_of_a_path_does_not_depend_on_other_files():
    paths = [f"pkg/mod{i}.py" for i in range(200)]
    docs = [p.encode() * 3 for p in paths]
    full = split_corpus("x", paths, docs, 0.1)
    half = split_corpus("x", paths[::2], docs[::2], 0.1)
    assert set(half.val_paths) == set(full.val_paths) & set(paths[::2])
    assert 5 < len(full.val_paths) < 40


def test_fingerprint_changes_with_content(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 50)
    (tmp_path / "b.txt").write_text("more text\n" * 50)
    before = path_corpus(tmp_path).fingerprint
    assert path_corpus(tmp_path).fingerprint == before
    (tmp_path / "b.txt").write_text("more text!\n" * 50)
    assert path_corpus(tmp_path).fingerprint != before


def test_path_corpus_folder_skips_binary_and_hidden(tmp_path):
    (tmp_path / "z.txt").write_text("zeta " * 100)
    (tmp_path / "a.md").write_text("alpha " * 100)
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "h.txt").write_text("secret")
    c = path_corpus(tmp_path)
    text = b"".join(c.train_docs + c.val_docs)
    assert b"zeta" in text and b"alpha" in text and b"secret" not in text and b"\x00" not in text


def test_single_file_holds_out_its_tail(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("".join(f"line {i}\n" for i in range(1000)))
    c = path_corpus(f, val_fraction=0.1)
    assert c.train_docs[0] + c.val_docs[0] == f.read_bytes()
    assert abs(len(c.val_docs[0]) - 0.1 * f.stat().st_size) <= 1


@pytest.mark.parametrize("make", ["missing", "empty_file", "empty_dir", "binary_only"])
def test_bad_data_paths_give_clear_errors(tmp_path, make):
    path = tmp_path / "data"
    if make == "empty_file":
        path.write_text("")
    elif make == "empty_dir":
        path.mkdir()
    elif make == "binary_only":
        path.mkdir()
        (path / "x.bin").write_bytes(b"\x00\x01" * 100)
    with pytest.raises(ValueError, match="data path .*(does not exist|holds no text)"):
        path_corpus(path)


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "déf f(x):\n    return x ** 2  # ✓\n".encode()
    ids = tok.encode(text)
    assert ids.dtype == torch.int32 and ids.tolist() == list(text)
    assert tok.decode(ids.tolist() + [tok.eos_id]) == text.decode()
    stream = encode_docs(tok, [b"ab", b"c"])
    assert stream.tolist() == [97, 98, tok.eos_id, 99, tok.eos_id]


def test_bpe_tokenizer_trains_saves_and_reloads(tmp_path):
    pytest.importorskip("tokenizers")
    docs = [f"def function_{i}(value):\n    return value + {i}\n".encode() for i in range(300)]
    c = split_corpus("fn", [f"f{i}.py" for i in range(300)], docs, 0.1)
    data = build_token_data(c, "bpe", 300, tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    assert data.tokenizer.vocab_size <= 300
    assert data.val_tokens_per_byte < 0.8  # merges learned: fewer tokens than bytes
    again = build_token_data(c, "bpe", 300, tmp_path, reuse=True)
    assert torch.equal(again.train_N, data.train_N)
    text = "def function_7(value):\n    return value + 7\n"
    assert again.tokenizer.decode(again.tokenizer.encode(text.encode()).tolist()) == text


def test_windows_targets_are_inputs_shifted_by_one():
    tokens = torch.arange(100, dtype=torch.int32)
    x, y = windows(tokens, torch.tensor([0, 10, 88]), 11)
    assert x.shape == y.shape == (3, 11) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and int(y[2, -1]) == 99


def test_sampler_state_restores_the_same_batches():
    tokens = torch.randint(0, 50, (1000,), dtype=torch.int32)
    a = BatchSampler(tokens, 16, seed=3)
    a.next_batch(4)
    state = a.state_dict()
    expect = [a.next_batch(4) for _ in range(3)]
    b = BatchSampler(tokens, 16, seed=99)
    b.load_state_dict(state)
    got = [b.next_batch(4) for _ in range(3)]
    assert all(torch.equal(e[0], g[0]) for e, g in zip(expect, got, strict=True))
    assert b.batches_drawn == 4


def test_eval_batches_are_fixed_and_cover_the_stream():
    tokens = torch.arange(500, dtype=torch.int32)
    first = [x for x, _ in eval_batches(tokens, 10, 3, 4)]
    second = [x for x, _ in eval_batches(tokens, 10, 3, 4)]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert int(first[0][0, 0]) == 0 and int(first[-1][-1, -1]) == 500 - 2


def test_too_short_split_is_rejected():
    with pytest.raises(ValueError, match="seq_len"):
        BatchSampler(torch.zeros(10, dtype=torch.int32), 16, seed=0)


def test_unigram_entropy_by_hand():
    assert unigram_bits_per_byte([b"aabb"]) == pytest.approx(1.0)
    assert unigram_bits_per_byte([b"ab", b"cd"]) == pytest.approx(2.0)
    assert unigram_bits_per_byte([b"zzzz"]) == pytest.approx(0.0)


def test_bits_per_byte_uses_tokens_per_byte():
    c = split_corpus("x", ["a", "b"], [b"x" * 99, b"y" * 99], 0.5)
    data = TokenData(ByteTokenizer(), c, torch.zeros(10, dtype=torch.int32),
                     torch.zeros(c.val_bytes * 2, dtype=torch.int32))
    assert data.bits_per_byte(math.log(2)) == pytest.approx(2.0)

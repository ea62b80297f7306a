"""Data: corpora (the embedded default is the Python stdlib source), tokenizers, batching."""

from moekit.data.batching import BatchSampler, eval_batches, windows
from moekit.data.corpus import Corpus, path_corpus, stdlib_corpus
from moekit.data.dataset import TokenData, build_token_data, load_corpus, unigram_bits_per_byte
from moekit.data.tokenizer import TOKENIZERS, BPETokenizer, ByteTokenizer, encode_docs

__all__ = [
    "BatchSampler", "eval_batches", "windows", "Corpus", "path_corpus", "stdlib_corpus",
    "TokenData", "build_token_data", "load_corpus", "unigram_bits_per_byte",
    "TOKENIZERS", "BPETokenizer", "ByteTokenizer", "encode_docs",
]

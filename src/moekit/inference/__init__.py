"""Inference: generation with a KV cache, and the swaps that prepare a model for it."""

from moekit.inference.generate import generate, sample_next
from moekit.inference.prepare import Prepared, prepare_for_inference, restore

__all__ = ["generate", "sample_next", "prepare_for_inference", "restore", "Prepared"]

"""Inference: generation with a KV cache."""

from moekit.inference.generate import generate, sample_next

__all__ = ["generate", "sample_next"]

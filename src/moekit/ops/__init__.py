"""Tensor functions only: no modules, no config."""

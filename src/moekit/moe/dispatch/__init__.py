"""Dispatch variants, chosen by name (MoEConfig.dispatch)."""

from moekit.moe.dispatch import capacity, dropless  # noqa: F401  (register)
from moekit.moe.dispatch.base import DISPATCHERS, make_plan

__all__ = ["DISPATCHERS", "make_plan"]

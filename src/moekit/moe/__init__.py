"""The MoE layer in data-path order: router/, dispatch/, experts/, balance/, layer.py."""

from moekit.moe.config import MoEConfig
from moekit.moe.layer import MoELayer
from moekit.moe.types import DispatchPlan, MoEOutput, Routing, RoutingStats

__all__ = ["MoEConfig", "MoELayer", "MoEOutput", "Routing", "DispatchPlan", "RoutingStats"]

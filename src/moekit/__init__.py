"""moekit: a PyTorch toolkit for Mixture-of-Experts models."""

from moekit.moe import DispatchPlan, MoEConfig, MoELayer, MoEOutput, Routing, RoutingStats

__version__ = "0.1.0"
__all__ = ["MoEConfig", "MoELayer", "MoEOutput", "Routing", "DispatchPlan", "RoutingStats", "__version__"]

"""moekit: a PyTorch toolkit for Mixture-of-Experts models."""

from moekit.moe import DispatchPlan, MoEConfig, MoELayer, MoEOutput, Routing, RoutingStats

__version__ = "0.1.0"
__all__ = ["MoEConfig", "MoELayer", "MoEOutput", "Routing", "DispatchPlan", "RoutingStats", "__version__"]


def __getattr__(name: str):
    """Lazy: `moekit.from_pretrained` imports the HF loader only when first used."""
    if name == "from_pretrained":
        from moekit.models.hf import from_pretrained

        return from_pretrained
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")

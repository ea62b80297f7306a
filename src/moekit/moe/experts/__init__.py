"""Expert banks and kinds (MoEConfig.expert, MoEConfig.expert_backend)."""

from moekit.moe.experts.activations import ACTIVATIONS, Activation
from moekit.moe.experts.bank import BACKENDS, ExpertBank
from moekit.moe.experts.dense import DenseFFN, SharedExperts

__all__ = ["ACTIVATIONS", "Activation", "BACKENDS", "ExpertBank", "DenseFFN", "SharedExperts"]

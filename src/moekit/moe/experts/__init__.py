"""Expert banks and kinds (MoEConfig.expert, MoEConfig.experts_impl); bank.py has the seam."""

from moekit.moe.experts.activations import ACTIVATIONS, Activation
from moekit.moe.experts.bank import EXPERTS_IMPLS, IMPL_NAMES, ExpertBank, Experts, resolve_impl
from moekit.moe.experts.dense import DenseFFN, SharedExperts

__all__ = ["ACTIVATIONS", "Activation", "EXPERTS_IMPLS", "IMPL_NAMES", "ExpertBank", "Experts", "DenseFFN",
           "SharedExperts", "resolve_impl"]

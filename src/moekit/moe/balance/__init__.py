"""Balance: losses and the bias update as pure functions of a Routing, plus stats."""

from moekit.moe.balance.bias import LoadAccumulator, update_expert_bias, update_router_biases
from moekit.moe.balance.losses import (
    LOSSES,
    cv2_loss,
    cv_squared,
    router_z_loss,
    seq_aux_loss,
    switch_aux_loss,
)
from moekit.moe.balance.stats import routing_stats

__all__ = [
    "LOSSES", "cv2_loss", "cv_squared", "router_z_loss", "seq_aux_loss", "switch_aux_loss",
    "routing_stats", "update_expert_bias", "update_router_biases", "LoadAccumulator",
]

"""Routers, chosen by name (MoEConfig.router). Each file is one variant."""

from moekit.moe.router import (  # noqa: F401  (imported to register)
    dselect_k,
    dts,
    expert_choice,
    gshard_random2,
    hash,
    noisy_topk,
    soft,
    soft_moe,
    softmax_group_limited,
    topk_sigmoid,
    topk_sigmoid_plain,
    topk_softmax,
)
from moekit.moe.router.base import ROUTERS, Router

__all__ = ["ROUTERS", "Router", "build_router"]


def build_router(cfg) -> Router:
    return ROUTERS.get(cfg.router)(cfg)

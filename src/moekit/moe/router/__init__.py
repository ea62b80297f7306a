"""Routers, chosen by name (MoEConfig.router). Each file is one variant."""

from moekit.moe.router.base import ROUTERS, Router
from moekit.moe.router import gshard_random2, noisy_topk, topk_sigmoid, topk_softmax  # noqa: F401  (register)
from moekit.moe.router import dselect_k, dts, expert_choice, hash, soft, soft_moe  # noqa: F401  (register)

__all__ = ["ROUTERS", "Router", "build_router"]


def build_router(cfg) -> Router:
    return ROUTERS.get(cfg.router)(cfg)

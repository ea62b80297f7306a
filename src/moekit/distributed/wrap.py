"""expert_parallel: shard the experts of a built model (or one MoELayer) from outside.

The model code stays single-device (DESIGN.md: moe/ and models/ never import
distributed/). Each MoELayer keeps its router (replicated, so routing is computed
locally on each rank's own tokens) and its dispatch; only `layer.experts` is swapped
for an EPExperts holding this rank's slice, which runs the all-to-all path.

Capacity dispatch under EP: each rank drops with C = ceil(cf · T_local · K / E), its
own tokens only, before the all-to-all, so an expert receives at most ep·C rows per
step. This is GShard's choice (Lepikhin et al. 2020 §2.2/§3.2: tokens are split into
G groups, one per device, and capacity is per group per expert); it needs no extra
communication and equals EP=1 run shard by shard. A global-capacity variant would
need the requested counts of every rank before dropping (one more all-to-all).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moekit.distributed.experts import EPExperts
from moekit.distributed.groups import ParallelGroups, groups_from, make_groups
from moekit.moe.layer import MoELayer


def moe_layers_of(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def expert_parallel(model: nn.Module, ep_group=None, *, ep_size: int | None = None,
                    edp_group=None, dp_group=None, broadcast_from: int | None = 0) -> nn.Module:
    """Shard every MoELayer's experts over an expert-parallel group, in place.

    ep_group: the group splitting the experts (None: the whole world, unless ep_size
        is given, in which case groups are built EP-major with make_groups(ep_size)).
    edp_group / dp_group: expert-data-parallel group and the non-expert DP group
        (None: no expert replicas / the whole world).
    broadcast_from: a global rank whose parameters and buffers every rank copies first,
        so all replicas start equal even if they were built with different seeds
        (None to skip, when the caller guarantees equal weights).
    Returns the model; call sync_gradients(model) after backward.
    """
    if not dist.is_initialized():
        raise RuntimeError("expert_parallel: torch.distributed is not initialised; call "
                           "init_process_group first (or run under torchrun)")
    if ep_size is not None and ep_group is not None:
        raise ValueError("expert_parallel: pass ep_group or ep_size, not both")
    groups = make_groups(ep_size) if ep_size is not None else groups_from(ep_group, edp_group, dp_group)
    layers = moe_layers_of(model)
    if not layers:
        raise ValueError(f"expert_parallel: {type(model).__name__} contains no MoELayer")
    for layer in layers:  # fail before touching anything
        E = layer.experts.num_experts
        if E % groups.ep_size:
            raise ValueError(f"expert_parallel: num_experts={E} is not divisible by the "
                             f"expert-parallel size ep={groups.ep_size}")
    if broadcast_from is not None:
        broadcast_state(model, broadcast_from, groups.dp_group)
    for layer in layers:
        layer.experts = EPExperts(layer.experts, groups)
    return model


@torch.no_grad()
def broadcast_state(model: nn.Module, src: int = 0, group=None) -> None:
    """Copy every parameter and buffer of rank src to all ranks of the group."""
    for t in [*model.parameters(), *model.buffers()]:
        dist.broadcast(t.data, src=src, group=group)


def ep_modules(model: nn.Module) -> list[EPExperts]:
    return [m for m in model.modules() if isinstance(m, EPExperts)]


def groups_of(model: nn.Module) -> ParallelGroups | None:
    """The groups of an expert-parallel model (one set for all layers), else None."""
    mods = ep_modules(model)
    if not mods:
        return None
    groups = {id(m.groups) for m in mods}
    if len(groups) > 1:
        raise ValueError("expert_parallel: layers sharded over different groups are not supported")
    return mods[0].groups

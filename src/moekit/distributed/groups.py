"""Process groups of expert parallelism: world = ep × dp_e.

Ranks are laid out EP-major: expert-parallel groups are blocks of ep consecutive
ranks ([0..ep), [ep..2ep), ...), so with ep ≤ GPUs per node the all-to-all stays
on NVLink (DeepSeek-V3 instead spans 8 nodes and limits each token to 4 of them).
Ranks holding the same expert shard (same position in their block) form the
expert-data-parallel group that reduces expert gradients. Every rank is a data-
parallel replica of the non-expert parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class ParallelGroups:
    """Handles and sizes; a group of size 1 is None (no collective is issued on it)."""

    ep_group: object | None  # ranks that split the experts between them (all-to-all)
    edp_group: object | None  # ranks holding the same experts (expert grads all-reduced)
    dp_group: object | None  # ranks replicating non-expert parameters (None = WORLD)
    ep_size: int
    ep_rank: int
    dp_size: int  # number of data-parallel replicas of the non-expert parameters


def make_groups(ep_size: int | None = None) -> ParallelGroups:
    """Build EP and expert-DP groups for the default process group. Collective: every
    rank must call it, in the same order as its other new_group calls."""
    world, rank = dist.get_world_size(), dist.get_rank()
    ep_size = world if ep_size is None else ep_size
    if not isinstance(ep_size, int) or ep_size <= 0 or world % ep_size:
        raise ValueError(f"expert_parallel: ep={ep_size!r} must be a positive divisor of the "
                         f"world size ({world})")
    ep_group = edp_group = None
    for start in range(0, world, ep_size):  # new_group is collective: all ranks build all
        g = dist.new_group(list(range(start, start + ep_size)))
        if start <= rank < start + ep_size:
            ep_group = g
    for pos in range(ep_size):
        g = dist.new_group(list(range(pos, world, ep_size)))
        if rank % ep_size == pos:
            edp_group = g
    return ParallelGroups(
        ep_group=ep_group if ep_size > 1 else None,
        edp_group=edp_group if world // ep_size > 1 else None,
        dp_group=None,
        ep_size=ep_size,
        ep_rank=rank % ep_size,
        dp_size=world,
    )


def groups_from(ep_group, edp_group=None, dp_group=None) -> ParallelGroups:
    """Wrap caller-made groups. ep_group None means every rank of the world."""
    ep_size = dist.get_world_size(ep_group)
    edp_size = 1 if edp_group is None else dist.get_world_size(edp_group)
    return ParallelGroups(
        ep_group=ep_group if ep_size > 1 else None,
        edp_group=edp_group if edp_size > 1 else None,
        dp_group=dp_group,
        ep_size=ep_size,
        ep_rank=dist.get_rank(ep_group),
        dp_size=dist.get_world_size(dp_group),
    )

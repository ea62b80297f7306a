"""Expert parallelism on torch.distributed, applied from outside to a built model.

    model = expert_parallel(build_model(cfg), ep_size=2)   # shard experts, all-to-all path
    loss.backward(); sync_gradients(model)                 # DP means; experts over expert-DP
    allreduce_loads(loads_E); update_expert_bias(...)      # same bias on every rank
    full = gather_expert_state(model)                      # experts under global ids
    load_expert_parallel_state(other_model, full)          # at any EP size
"""

from moekit.distributed.checkpoint import (
    expert_keys,
    gather_expert_state,
    load_expert_parallel_state,
    shard_expert_state,
)
from moekit.distributed.comm import CollectiveError, all_to_all_rows
from moekit.distributed.experts import EPExperts
from moekit.distributed.grads import allreduce_loads, clip_grad_norm_, sync_gradients
from moekit.distributed.groups import ParallelGroups, make_groups
from moekit.distributed.wrap import broadcast_state, expert_parallel, groups_of

__all__ = [
    "expert_parallel", "EPExperts", "ParallelGroups", "make_groups", "groups_of",
    "broadcast_state", "all_to_all_rows", "CollectiveError", "sync_gradients",
    "allreduce_loads", "clip_grad_norm_", "expert_keys", "gather_expert_state",
    "shard_expert_state", "load_expert_parallel_state",
]

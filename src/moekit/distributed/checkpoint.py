"""Expert state under GLOBAL expert ids, so a run saved at one EP size resumes at another.

A sharded model keeps ExpertBank's key names (`...experts.w_in`), with a local leading
dim E/ep. gather_expert_state all-gathers those slices over the EP group into the full
(E, ...) tensors, whose index IS the global expert id: the saved file is exactly what
an EP=1 model saves, in the trainer's safetensors format. On load every rank reads the
full file and keeps its slice (shard_expert_state). The same functions work on any
dict keyed by parameter name (e.g. per-parameter optimizer moments).

NOTE: gathering puts the whole model on every rank for the duration of the save; fine
up to a node's memory. Past that, save each rank's slice with its expert range instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moekit.distributed.comm import _run
from moekit.distributed.experts import EPExperts
from moekit.distributed.wrap import groups_of
from moekit.moe.experts import ExpertBank


def expert_keys(model: nn.Module) -> list[str]:
    """State-dict keys of expert tensors (leading dim = experts), sharded or not."""
    keys = []
    for name, mod in model.named_modules():
        if isinstance(mod, (ExpertBank, EPExperts)):
            prefix = f"{name}." if name else ""
            keys += [prefix + n for n, _ in mod.named_parameters(recurse=False)]
    return keys


@torch.no_grad()
def gather_expert_state(model: nn.Module, state: dict[str, torch.Tensor] | None = None
                        ) -> dict[str, torch.Tensor]:
    """The full state with experts under global ids; collective over the EP group (every
    rank must call it; every rank gets the full dict). state defaults to model.state_dict()."""
    state = dict(model.state_dict() if state is None else state)
    groups = groups_of(model)
    if groups is None or groups.ep_group is None:
        return state
    for key in expert_keys(model):
        if key not in state:
            continue
        local = state[key].contiguous()
        parts = [torch.empty_like(local) for _ in range(groups.ep_size)]
        _run(f"all_gather of {key}", groups.ep_group, dist.all_gather, parts, local)
        state[key] = torch.cat(parts, 0)
    return state


def shard_expert_state(state: dict[str, torch.Tensor], ep_rank: int, ep_size: int,
                       keys: list[str]) -> dict[str, torch.Tensor]:
    """Keep rank ep_rank's experts [r·E/ep, (r+1)·E/ep) of each expert key; other keys
    are returned unchanged. Raises if a key is missing or E is not divisible by ep."""
    out = dict(state)
    for key in keys:
        if key not in state:
            raise KeyError(f"shard_expert_state: expert key {key!r} missing from the state")
        E = state[key].shape[0]
        if E % ep_size:
            raise ValueError(f"shard_expert_state: {key} has num_experts={E}, not divisible by "
                             f"ep={ep_size}")
        n = E // ep_size
        out[key] = state[key][ep_rank * n:(ep_rank + 1) * n]
    return out


def load_expert_parallel_state(model: nn.Module, full_state: dict[str, torch.Tensor],
                               strict: bool = True):
    """Load a global-id state (saved at any EP size) into this model at its EP size."""
    groups = groups_of(model)
    ep_rank, ep_size = (0, 1) if groups is None else (groups.ep_rank, groups.ep_size)
    return model.load_state_dict(shard_expert_state(full_state, ep_rank, ep_size, expert_keys(model)),
                                 strict=strict)

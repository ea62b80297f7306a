"""`moekit train --ep N` under torchrun: process group, device, and the hooks the trainer
calls at its few distributed points (each a no-op question when not expert-parallel).

    torchrun --nproc_per_node 2 $(which moekit) train --ep 2 ...   (gloo on CPU, NCCL on GPU)

Every rank runs the same trainer on the same global batch sequence and keeps its slice
of each batch (shard_rows), so the sampler state is identical everywhere and a resume
at another world size continues the same data. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn

from moekit.distributed.checkpoint import expert_keys, gather_expert_state, shard_expert_state
from moekit.distributed.comm import _run
from moekit.distributed.grads import allreduce_loads, clip_grad_norm_, sync_gradients
from moekit.distributed.wrap import expert_parallel, groups_of


@dataclass(frozen=True)
class EPRun:
    ep: int
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        return expert_parallel(model, ep_size=self.ep)

    def barrier(self) -> None:
        _run("barrier", None, dist.barrier)

    def from_main(self, obj):
        """Rank 0's value of a small picklable object (e.g. a timestamped run folder)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


class NullReporter:
    """What ranks other than 0 report to: nothing (rank 0 writes metrics.jsonl)."""

    def train(self, record: dict) -> None: ...

    def eval(self, record: dict) -> None: ...

    def close(self) -> None: ...


def init_ep_run(ep: int, device: str = "auto", timeout_s: float = 600.0) -> EPRun:
    """Join the torchrun job (env RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ValueError(f"--ep {ep} needs a distributed launch: torchrun --nproc_per_node N "
                         f"$(which moekit) train --ep {ep} ... (N divisible by {ep})")
    world, local = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if not isinstance(ep, int) or ep <= 0 or world % ep:
        raise ValueError(f"--ep={ep!r} is invalid: must be a positive divisor of the world size {world}")
    cuda = device in ("auto", "cuda") and torch.cuda.is_available() or device.startswith("cuda")
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return EPRun(ep, dist.get_rank(), world, dev)


# ---- hooks called by moekit.training (all no-ops for a single process)
def is_distributed(model: nn.Module) -> bool:
    return dist.is_available() and dist.is_initialized() and groups_of(model) is not None


def shard_rows(x_B: torch.Tensor) -> torch.Tensor:
    """This DP rank's rows of a global batch (batch must divide by the world size)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if x_B.shape[0] % world:
        raise ValueError(f"train.batch_size={x_B.shape[0]} is invalid under --ep: must be divisible "
                         f"by the world size {world} (times grad_accum)")
    n = x_B.shape[0] // world
    return x_B[rank * n:(rank + 1) * n]


def after_backward(model: nn.Module, loss: float, aux: float) -> tuple[float, float]:
    """Average gradients over replicas; return the batch-mean loss and aux over ranks."""
    sync_gradients(model)
    device = next(model.parameters()).device
    t = torch.tensor([loss, aux], dtype=torch.float64, device=device)
    _run("loss all-reduce", None, dist.all_reduce, t)
    t /= dist.get_world_size()
    return float(t[0]), float(t[1])


def reduce_loads(loads_LE: torch.Tensor | None) -> torch.Tensor | None:
    """Global expert loads, so every rank moves its router bias the same way."""
    return loads_LE if loads_LE is None else allreduce_loads(loads_LE)


def clip_global(model: nn.Module, max_norm: float) -> torch.Tensor:
    return clip_grad_norm_(model, max_norm)


def _expert_optim_keys(model: nn.Module, tensors: dict[str, torch.Tensor]) -> list[str]:
    names = set(expert_keys(model))
    return [k for k, v in tensors.items() if k.startswith("optim/") and v.dim() > 0
            and k[len("optim/"):].rpartition("/")[0] in names]


class _StateOnly(nn.Module):
    """Hands a ready state dict to safetensors.save_model (which dedups tied tensors)."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self._state = state

    def state_dict(self, *args, **kwargs):  # noqa: ARG002
        return dict(self._state)


def save_checkpoint(save_fn, root, step: int, model: nn.Module, tensors: dict, meta: dict,
                    keep_last: int) -> Path:
    """Gather experts (weights and optimizer moments) under global ids, rank 0 writes with
    the trainer's own atomic save_fn; every rank returns the path once it is published."""
    full = gather_expert_state(model)
    tensors = _gather_keys(model, tensors, _expert_optim_keys(model, tensors))
    path = save_fn(root, step, _StateOnly(full), tensors, meta, keep_last) if dist.get_rank() == 0 else None
    box = [str(path) if path is not None else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def _gather_keys(model, tensors, keys):
    groups = groups_of(model)
    out = dict(tensors)
    if groups.ep_group is None:
        return out
    for k in keys:
        parts = [torch.empty_like(tensors[k]) for _ in range(groups.ep_size)]
        _run(f"all_gather of {k}", groups.ep_group, dist.all_gather, parts, tensors[k].contiguous())
        out[k] = torch.cat(parts, 0)
    return out


def load_checkpoint(load_fn, path, model: nn.Module) -> tuple[dict, dict]:
    """The trainer's load_fn for the train state, then model weights and expert moments
    sliced to this rank's experts (the file holds global ids, from any EP size)."""
    tensors, meta = load_fn(path, None)
    state = load_file(str(Path(path) / "model.safetensors"))
    _fill_tied(model, state)
    groups = groups_of(model)
    state = shard_expert_state(state, groups.ep_rank, groups.ep_size, expert_keys(model))
    model.load_state_dict(state, strict=True)
    okeys = _expert_optim_keys(model, tensors)
    return shard_expert_state(tensors, groups.ep_rank, groups.ep_size, okeys), meta


def _fill_tied(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """save_model stores tied tensors once; give the dropped names their partner's tensor."""
    by_ptr: dict[int, list[str]] = {}
    for k, v in model.state_dict().items():
        by_ptr.setdefault(v.data_ptr(), []).append(k)
    for names in by_ptr.values():
        present = [n for n in names if n in state]
        for n in names:
            if n not in state and present:
                state[n] = state[present[0]]

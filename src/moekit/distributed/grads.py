"""Gradient and load reductions the trainer calls between backward and the optimizer step.

Each rank's loss is the mean over its own tokens; the objective is the mean over the
dp_size data-parallel replicas. So every gradient is summed over the ranks that hold a
copy of it and divided by dp_size:
  non-expert parameters: all-reduce over the DP group (every replica), / dp_size;
  expert parameters: the reverse all-to-all already summed the contributions of the
    EP group's tokens; all-reduce over the expert-DP group adds the other EP groups'
    tokens, / dp_size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moekit.distributed.comm import _run
from moekit.distributed.wrap import ep_modules, groups_of


def _split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    expert_ids = {id(p) for m in ep_modules(model) for p in m.parameters()}
    dense, expert = [], []
    for p in model.parameters():
        if p.requires_grad:
            (expert if id(p) in expert_ids else dense).append(p)
    return dense, expert


@torch.no_grad()
def _allreduce_mean(params: list[nn.Parameter], group, divisor: int, what: str) -> None:
    """One flat all-reduce per dtype; a missing grad counts as zero (and is created) so
    every rank issues the same collectives."""
    by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        by_dtype.setdefault(p.grad.dtype, []).append(p)
    for ps in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        if group is not None or divisor > 1:
            _run(what, group, dist.all_reduce, flat)
        flat.div_(divisor)
        off = 0
        for p in ps:
            n = p.grad.numel()
            p.grad.copy_(flat[off:off + n].view_as(p.grad))
            off += n


def sync_gradients(model: nn.Module, dp_group=None) -> None:
    """Average gradients over data-parallel replicas (see the module docstring).
    A model without EPExperts is treated as plain DP over dp_group (default WORLD)."""
    groups = groups_of(model)
    dense, expert = _split_params(model)
    dp_group = groups.dp_group if groups is not None else dp_group
    dp_size = dist.get_world_size(dp_group)
    _allreduce_mean(dense, dp_group, dp_size, "gradient all-reduce (non-expert)")
    if expert:
        _allreduce_mean_experts(expert, groups, dp_size)


def _allreduce_mean_experts(expert, groups, dp_size) -> None:
    if groups.edp_group is None:  # one copy of each expert: only the division remains
        with torch.no_grad():
            for p in expert:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.div_(dp_size)
        return
    _allreduce_mean(expert, groups.edp_group, dp_size, "gradient all-reduce (experts)")


def allreduce_loads(loads, group=None):
    """Sum per-expert loads (a tensor, or a list/tuple/dict of tensors) over the DP group
    in place, so the aux-loss-free bias update (DeepSeek-V3 §2.1.2) sees the global load
    and every rank moves its replicated bias identically. Returns its argument."""
    tensors = list(loads.values()) if isinstance(loads, dict) else (
        [loads] if isinstance(loads, torch.Tensor) else list(loads))
    if not tensors or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return loads
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])  # exact for counts
    _run("load all-reduce", group, dist.all_reduce, flat)
    off = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[off:off + t.numel()].view_as(t))
            off += t.numel()
    return loads


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the GLOBAL model: expert shards' squared norms
    are summed over the EP group, so every replica scales its grads by the same factor.
    Call after sync_gradients. Returns the total norm (fp32)."""
    groups = groups_of(model)
    dense, expert = _split_params(model)
    device = next(model.parameters()).device
    sq = lambda ps: sum((p.grad.float().pow(2).sum() for p in ps if p.grad is not None),  # noqa: E731
                        torch.zeros((), dtype=torch.float32, device=device))
    total_sq = sq(dense)
    if expert:
        e_sq = sq(expert)
        if groups.ep_group is not None:
            _run("grad-norm all-reduce", groups.ep_group, dist.all_reduce, e_sq)
        total_sq = total_sq + e_sq
    norm = total_sq.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for p in dense + expert:
        if p.grad is not None:
            p.grad.mul_(coef.to(p.grad.dtype))
    return norm

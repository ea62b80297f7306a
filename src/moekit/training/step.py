"""One optimizer step with gradient accumulation, and the router-bias update.

k micro-steps of B/k sequences equal one batch of B: each micro-step's loss is the mean
over its own tokens, so dividing by k gives the batch mean (micro-batches are equal, see
TrainConfig). The aux loss is averaged the same way; losses that are means over tokens or
sequences (z-loss, DeepSeek-V3 sequence-wise loss) then match the big batch exactly,
while batch-level ones (Switch f·P, CV²) are per micro-batch, as in Megatron-LM. Expert
loads are counts, so they are summed over micro-steps, and the DeepSeek-V3 bias moves
once per optimizer step, from the load of the whole batch.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from moekit.moe.balance import update_router_biases


@dataclass(frozen=True)
class StepResult:
    loss: float  # mean next-token cross entropy over the batch (nats)
    aux_loss: float  # mean of the micro-steps' summed aux losses
    grad_norm: float  # before clipping
    loads_LE: torch.Tensor | None  # slots requested per expert, per MoE layer, whole batch
    skipped: bool  # a non-finite loss or gradient: no update was applied


def autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def accumulate(model, micro_batches, device, dtype: str = "float32"):
    """Forward+backward over the micro-batches; returns (loss, aux, loads_LE) of the batch."""
    k = len(micro_batches)
    loss_sum = aux_sum = 0.0
    loads_LE = None
    for x_BS, y_BS in micro_batches:
        with autocast(device, dtype):
            out = model(x_BS.to(device), targets_BS=y_BS.to(device))
        ((out.loss + out.aux_loss) / k).backward()
        loss_sum += out.loss.detach().double() / k
        aux_sum += torch.as_tensor(out.aux_loss).detach().double() / k
        step_loads = layer_loads(out.stats)
        if step_loads is not None:
            loads_LE = step_loads if loads_LE is None else loads_LE + step_loads
    return float(loss_sum), float(aux_sum), loads_LE


def layer_loads(stats) -> torch.Tensor | None:
    """(L_moe, E) slots requested per expert (before capacity drops) in each MoE layer."""
    rows = [s.requested_per_expert for s in stats if s is not None]
    return torch.stack(rows).detach() if rows else None


def reduce_loads(loads_LE: torch.Tensor) -> torch.Tensor:
    """Hook for data parallelism: all-reduce the loads so every rank moves its bias the
    same way. On one process the local load is the global one."""
    return loads_LE


@torch.no_grad()
def apply_bias_update(model, loads_LE: torch.Tensor | None) -> None:
    """DeepSeek-V3 aux-loss-free balancing (§2.1.2): one bias step per optimizer step, from
    the whole batch's load, for every MoE layer whose router keeps an `expert_bias`."""
    if loads_LE is not None:
        update_router_biases(model, list(reduce_loads(loads_LE)))


def train_step(model, optimizer, micro_batches, *, lr: float, grad_clip: float,
               device: torch.device, dtype: str = "float32") -> StepResult:
    """Accumulate, check for non-finite values, clip, step, move router biases."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss, aux, loads_LE = accumulate(model, micro_batches, device, dtype)
    ep = _ep_hooks(model)
    if ep is not None:  # expert parallel: average grads over replicas, global loss and loads
        loss, aux = ep.after_backward(model, loss, aux)
        loads_LE = ep.reduce_loads(loads_LE)
    params = [p for p in model.parameters() if p.grad is not None]
    max_norm = grad_clip if grad_clip > 0 else math.inf
    grad_norm = float(ep.clip_global(model, max_norm) if ep is not None
                      else torch.nn.utils.clip_grad_norm_(params, max_norm))
    skipped = not (math.isfinite(loss) and math.isfinite(aux) and math.isfinite(grad_norm))
    if not skipped:
        optimizer.step()
        apply_bias_update(model, loads_LE)
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, aux, grad_norm, loads_LE, skipped)


def _ep_hooks(model):
    """moekit.distributed.launch when the model is expert-parallel, else None."""
    from moekit.distributed import launch

    return launch if launch.is_distributed(model) else None


def build_optimizer(model, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (nanoGPT): norms and biases are not decayed."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # torch's fused kernel (one pass per tensor over param, grad and both moments) where it
    # runs: on CPU torch's default is a Python loop of per-tensor ops, which took 3.2 ms
    # per step for the `tiny` preset's 1.9M parameters at 2 threads against 0.6 ms fused;
    # an MoE model updates all its experts, so this cost grows with total, not active,
    # parameters (benchmarks/train.py)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


@torch.no_grad()
def evaluate(model, batches, device, dtype: str = "float32") -> float:
    """Mean validation loss (nats/token) over fixed batches; restores train mode."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for x_BS, y_BS in batches:
        with autocast(device, dtype):
            out = model(x_BS.to(device), targets_BS=y_BS.to(device))
        total += float(out.loss) * y_BS.numel()
        n += y_BS.numel()
    model.train(was_training)
    return total / max(1, n)

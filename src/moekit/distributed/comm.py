"""Autograd-aware all-to-all of rows with uneven splits, and the count exchange before it.

The backward of an all-to-all is the reverse all-to-all (splits swapped): row i sent
to rank p comes back as the gradient of the row p received. Written as a small
autograd Function rather than torch.distributed.nn.functional so the splits and the
error message are ours, and it runs the same on gloo (CPU) and NCCL (GPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class CollectiveError(RuntimeError):
    """A collective failed: usually a peer rank died or the group timed out."""


def _run(what: str, group, fn, *args, **kwargs):
    try:
        return fn(*args, group=group, **kwargs)
    except RuntimeError as e:  # DistBackendError is a RuntimeError
        rank = dist.get_rank() if dist.is_initialized() else -1
        raise CollectiveError(
            f"expert_parallel: {what} failed on rank {rank}; a peer rank may have died or "
            f"timed out (check the other ranks' logs): {e}"
        ) from e


def exchange_counts(send_counts_E: torch.Tensor, group, ep_size: int) -> torch.Tensor:
    """send_counts_E (E,): rows this rank sends to each global expert. Returns
    recv_counts_PL (ep, E/ep): rows that rank p sends to each of this rank's experts."""
    recv = torch.empty_like(send_counts_E)
    _run("count exchange (all_to_all_single)", group, dist.all_to_all_single, recv,
         send_counts_E.contiguous())
    return recv.view(ep_size, -1)


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RD, recv_splits, send_splits, group):
        ctx.splits, ctx.group = (recv_splits, send_splits), group
        out = x_RD.new_empty(sum(recv_splits), *x_RD.shape[1:])
        _run("all-to-all of expert rows", group, dist.all_to_all_single, out, x_RD.contiguous(),
             output_split_sizes=recv_splits, input_split_sizes=send_splits)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        recv_splits, send_splits = ctx.splits
        grad_in = grad_out.new_empty(sum(send_splits), *grad_out.shape[1:])
        _run("reverse all-to-all of row gradients", ctx.group, dist.all_to_all_single, grad_in,
             grad_out.contiguous(), output_split_sizes=send_splits, input_split_sizes=recv_splits)
        return grad_in, None, None, None


def all_to_all_rows(x_RD: torch.Tensor, recv_splits: list[int], send_splits: list[int],
                    group) -> torch.Tensor:
    """Send rows x_RD[sum(send[:p]) : sum(send[:p+1])] to rank p; receive recv[p] rows
    from rank p, concatenated in rank order. Differentiable."""
    return _AllToAllRows.apply(x_RD, list(recv_splits), list(send_splits), group)

"""The differentiable half of softmax top-k routing on CPU: csrc/route.cpp, with the torch
ops of moe/router/topk_softmax.py as the reference.

    probs, weights, lse = route_softmax(logits_TE, ids_TK, renormalize)

probs = softmax(logits) over the E experts; weights = probs at the chosen ids (divided by
their sum when renormalised); lse = logsumexp(logits) per row, for the z-loss. One kernel
call forward and one backward (why: see the .cpp). The ids carry no gradient (top-k).
"""

from __future__ import annotations

import torch

from moekit.ops import ext


def applies(logits_TE: torch.Tensor, ids_TK: torch.Tensor) -> bool:
    """CPU float32 logits of 2-D shape with some rows, int64 ids, and the kernels built."""
    return (logits_TE.device.type == "cpu" and logits_TE.dtype == torch.float32 and logits_TE.dim() == 2
            and logits_TE.shape[0] > 0 and ids_TK.dtype == torch.int64 and ext.available())


def route_softmax(logits_TE: torch.Tensor, ids_TK: torch.Tensor, renormalize: bool):
    """(probs_TE, weights_TK, lse_T) from the kernel (callers check `applies`)."""
    return _RouteSoftmax.apply(logits_TE, ids_TK, renormalize)


def reference(logits_TE: torch.Tensor, ids_TK: torch.Tensor, renormalize: bool):
    probs_TE = torch.softmax(logits_TE, dim=-1)
    weights_TK = probs_TE.gather(-1, ids_TK)
    if renormalize:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
    return probs_TE, weights_TK, torch.logsumexp(logits_TE, dim=-1)


class _RouteSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, ids_TK, renormalize: bool):
        logits_TE, ids_TK = logits_TE.contiguous(), ids_TK.contiguous()
        T, E = logits_TE.shape
        probs_TE = logits_TE.new_empty(T, E)
        weights_TK = logits_TE.new_empty(ids_TK.shape)
        lse_T = logits_TE.new_empty(T)
        ext.op("route_softmax_fwd")(logits_TE, ids_TK, renormalize, probs_TE, weights_TK, lse_T)
        ctx.save_for_backward(probs_TE, ids_TK, weights_TK)
        ctx.renormalize = renormalize
        return probs_TE, weights_TK, lse_T

    @staticmethod
    def backward(ctx, dprobs_TE, dweights_TK, dlse_T):
        probs_TE, ids_TK, weights_TK = ctx.saved_tensors
        empty = probs_TE.new_empty(0)
        dlogits_TE = torch.empty_like(probs_TE)
        ext.op("route_softmax_bwd")(probs_TE, ids_TK, weights_TK, ctx.renormalize,
                                    empty if dprobs_TE is None else dprobs_TE.contiguous(),
                                    empty if dweights_TK is None else dweights_TK.contiguous(),
                                    empty if dlse_T is None else dlse_T.contiguous(), dlogits_TE)
        return dlogits_TE, None, None

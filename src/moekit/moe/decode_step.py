"""A whole MoE layer step for a few tokens in one kernel call: route, dispatch, experts,
combine and shared experts (ops/csrc/decode_ffn.cpp: moe_decode_topk_softmax).

Why: at decode the layer is bound by reading the active experts' weights once, and
each torch call around that read costs more than it does in training: the weight
stream (tens of MB per layer) has evicted the caches the router's and dispatcher's
dozen small calls run from. Measured with benchmarks/decode_parts.py (fine, T = 1),
router plus dispatch took ~100-130 µs that way, against a ~1.1 ms weight read.

It serves the topk_softmax router (Mixtral, Qwen-MoE, OLMoE; GPT-OSS's softmax-after)
with dropless dispatch and SwiGLU experts on the grouped backend, at inference (no
gradient; in training mode only without jitter and expert dropout, the random draws),
CPU float32, up to FUSED_MAX_TOKENS tokens; `fused_layer` returns
None elsewhere and the layer runs stage by stage, which is the reference:
tests/test_decode.py checks y, the Routing and the DispatchPlan against it. The router,
dispatcher and expert modules are not called on this path, so hooks on them do not fire.
"""

from __future__ import annotations

import torch

from moekit.moe.experts.decode import kernel_weights
from moekit.moe.router.topk_softmax import TopKSoftmaxRouter
from moekit.moe.types import DispatchPlan, Routing
from moekit.ops import ext


def _kernel_args(layer, x_TD: torch.Tensor) -> tuple | None:
    """The kernel's arguments when it applies, else None. Kept to a few attribute reads:
    at decode the caches are cold and walking layer.parameters() alone cost ~35 µs."""
    cfg, r = layer.cfg, layer.router
    if type(r) is not TopKSoftmaxRouter or cfg.dispatch != "dropless" or layer.residual is not None:
        return None
    if layer.training and (cfg.jitter_eps > 0 or cfg.expert_dropout > 0):  # random draws: stages
        return None
    ffn = kernel_weights(x_TD, layer.experts, layer.shared)
    if ffn is None or r.weight.dtype != torch.float32 or (r.bias is not None and r.bias.dtype != torch.float32):
        return None
    weights = [w for w in (r.weight, r.bias, *ffn) if w is not None]
    if torch.is_grad_enabled() and (x_TD.requires_grad or any(w.requires_grad for w in weights)):
        return None
    if not ext.available():
        return None
    return (x_TD.contiguous(), r.weight, r.bias, cfg.top_k, cfg.softmax_order == "after", cfg.normalize_topk, *ffn)


def fused_layer(layer, x_TD: torch.Tensor) -> tuple[torch.Tensor, Routing, DispatchPlan] | None:
    """(y_TD, routing, plan) as the staged MoELayer would compute them, or None."""
    args = _kernel_args(layer, x_TD)
    if args is None:
        return None
    y_TD, logits_TE, probs_TE, ids_TK, weights_TK, tok_R, slot_R, weights_R, counts_E = ext.op(
        "moe_decode_topk_softmax")(*args)
    plan = DispatchPlan(token_idx_R=tok_R, slot_idx_R=slot_R, weights_R=weights_R, counts_E=counts_E,
                        requested_E=counts_E, num_tokens=x_TD.shape[0])
    return y_TD, Routing(ids_TK, weights_TK, logits_TE, probs_TE), plan

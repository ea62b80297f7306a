"""A whole MoE layer step for a few tokens in one kernel call: route, dispatch, experts,
combine and shared experts (ops/csrc/decode_ffn.cpp: moe_decode_topk).

Why: at decode the layer is bound by reading the active experts' weights once, and
each torch call around that read costs more than it does in training: the weight
stream (tens of MB per layer) has evicted the caches the router's and dispatcher's
dozen small calls run from. Measured with benchmarks/decode_parts.py (fine, T = 1),
router plus dispatch took ~100-130 µs that way, against a ~1.1 ms weight read.

It serves the topk_softmax router (Mixtral, Qwen-MoE, OLMoE; GPT-OSS's softmax-after)
and the topk_sigmoid one (DeepSeek-V3: selection bias, group-limited selection, routed
scaling) with dropless dispatch and SwiGLU experts on the grouped backend, at inference (no
gradient; in training mode only without jitter and expert dropout, the random draws),
CPU float32, up to FUSED_MAX_TOKENS tokens; `fused_layer` returns
None elsewhere and the layer runs stage by stage, which is the reference:
tests/test_decode.py checks y, the Routing and the DispatchPlan against it. The router,
dispatcher and expert modules are not called on this path, so hooks on them do not fire.
"""

from __future__ import annotations

import torch

from moekit.moe.experts.decode import kernel_weights, no_grad_needed
from moekit.moe.router.topk_sigmoid import TopKSigmoidRouter
from moekit.moe.router.topk_softmax import TopKSoftmaxRouter
from moekit.moe.types import DispatchPlan, Routing
from moekit.ops import ext


def _kernel_args(layer, x_TD: torch.Tensor) -> tuple | None:
    """The kernel's arguments when it applies, else None. Kept to a few attribute reads:
    at decode the caches are cold and walking layer.parameters() alone cost ~35 µs."""
    cfg, r = layer.cfg, layer.router
    sigmoid = type(r) is TopKSigmoidRouter
    if not (sigmoid or type(r) is TopKSoftmaxRouter) or cfg.dispatch != "dropless" or layer.residual is not None:
        return None
    if layer.training and (cfg.jitter_eps > 0 or cfg.expert_dropout > 0):  # random draws: stages
        return None
    if sigmoid and cfg.n_group > 1 and cfg.num_experts // cfg.n_group < 2:  # a group scores its best two
        return None
    ffn = kernel_weights(x_TD, layer.experts, layer.shared)
    sel_bias = r.expert_bias if sigmoid else None
    router = [w for w in (r.weight, r.bias, sel_bias) if w is not None]
    if ffn is None or any(w.dtype != torch.float32 for w in router):
        return None
    weights = router + [w for w in ffn if w is not None]
    if not no_grad_needed(x_TD, *weights) or not ext.available():
        return None
    return (x_TD.contiguous(), r.weight, r.bias, sel_bias, cfg.top_k, sigmoid, cfg.softmax_order == "after",
            cfg.normalize_topk, cfg.routed_scaling_factor, cfg.n_group if sigmoid else 1,
            cfg.topk_group if sigmoid else 1, *ffn)


def fused_layer(layer, x_TD: torch.Tensor) -> tuple[torch.Tensor, Routing, DispatchPlan] | None:
    """(y_TD, routing, plan) as the staged MoELayer would compute them, or None."""
    args = _kernel_args(layer, x_TD)
    if args is None:
        return None
    y_TD, logits_TE, probs_TE, ids_TK, weights_TK, tok_R, slot_R, weights_R, counts_E = ext.op(
        "moe_decode_topk")(*args)
    plan = DispatchPlan(token_idx_R=tok_R, slot_idx_R=slot_R, weights_R=weights_R, counts_E=counts_E,
                        requested_E=counts_E, num_tokens=x_TD.shape[0], top_k=ids_TK.shape[1])
    return y_TD, Routing(ids_TK, weights_TK, logits_TE, probs_TE), plan

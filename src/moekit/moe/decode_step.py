"""A whole MoE layer step for a few tokens in one kernel call: route, dispatch, experts,
combine and shared experts (ops/csrc/decode_ffn.cpp: moe_decode_topk_softmax).

Why: at decode the layer is bound by reading the active experts' weights once, and
each torch call around that read costs more than it does in training: the weight
stream (tens of MB per layer) has evicted the caches the router's and dispatcher's
dozen small calls run from. Measured with benchmarks/decode_parts.py (fine, T = 1),
router plus dispatch took ~100-130 µs that way, against a ~1.1 ms weight read.

It serves the topk_softmax router (Mixtral, Qwen-MoE, OLMoE; GPT-OSS's softmax-after)
with dropless dispatch and SwiGLU experts on the grouped backend, at inference (eval
mode, no gradient), CPU float32, up to FUSED_MAX_TOKENS tokens; `fused_layer` returns
None elsewhere and the layer runs stage by stage, which is the reference:
tests/test_decode.py checks y, the Routing and the DispatchPlan against it.
"""

from __future__ import annotations

import torch

from moekit.moe.experts.decode import FUSED_MAX_TOKENS, standard_modules
from moekit.moe.router.topk_softmax import TopKSoftmaxRouter
from moekit.moe.types import DispatchPlan, Routing
from moekit.ops import ext


def _takes(layer, x_TD: torch.Tensor) -> bool:
    cfg, ex, sh = layer.cfg, layer.experts, layer.shared
    if layer.training or not 0 < x_TD.shape[0] <= FUSED_MAX_TOKENS or type(layer.router) is not TopKSoftmaxRouter:
        return False
    if not standard_modules(ex, sh):
        return False
    if cfg.dispatch != "dropless" or layer.residual is not None or ex.backend_name != "grouped":
        return False
    if ex.act.name != "swiglu" or (sh is not None and sh.ffn.act.name != "swiglu"):
        return False
    if x_TD.device.type != "cpu" or x_TD.dtype != torch.float32:
        return False
    params = list(layer.parameters())
    if any(p.dtype != torch.float32 for p in params):
        return False
    if torch.is_grad_enabled() and (x_TD.requires_grad or any(p.requires_grad for p in params)):
        return False
    return ext.available()


def fused_layer(layer, x_TD: torch.Tensor) -> tuple[torch.Tensor, Routing, DispatchPlan] | None:
    """(y_TD, routing, plan) as the staged MoELayer would compute them, or None."""
    if not _takes(layer, x_TD):
        return None
    cfg, r, sh = layer.cfg, layer.router, layer.shared
    y_TD, logits_TE, probs_TE, ids_TK, weights_TK, tok_R, slot_R, weights_R, counts_E = ext.op(
        "moe_decode_topk_softmax")(
        x_TD.contiguous(), r.weight, r.bias, cfg.top_k, cfg.softmax_order == "after", cfg.normalize_topk,
        layer.experts.w_in, layer.experts.w_out,
        None if sh is None else sh.ffn.w_in, None if sh is None else sh.ffn.w_out,
        None if sh is None or sh.gate is None else sh.gate.weight.reshape(-1))
    plan = DispatchPlan(token_idx_R=tok_R, slot_idx_R=slot_R, weights_R=weights_R, counts_E=counts_E,
                        requested_E=counts_E, num_tokens=x_TD.shape[0])
    return y_TD, Routing(ids_TK, weights_TK, logits_TE, probs_TE), plan

"""A decode step of an MoE layer in one kernel call: an inference-time swap, made from
outside the layer by `prepare_for_inference`.

Why: at decode (1-8 tokens) a layer is bound by reading the active experts' weights
once, and each torch call around that read costs more than in training: the weight
stream (tens of MB a layer) has evicted the caches the router's and dispatcher's dozen
small calls run from (fine, T = 1: ~100-130 µs of them against a ~1.1 ms weight read,
`python benchmarks/decode_parts.py`). ops/decode_ffn.py's kernels do it in one call:

  kind "layer"    route (topk_softmax or topk_sigmoid) + dropless dispatch + experts +
                  combine + shared experts: `layer_step`;
  kind "experts"  the layer's own router and dispatch, then experts + combine + shared
                  experts in one call (`experts_step`): any other router or dispatch.

Which kind a layer gets is decided once, by `fusion_for(layer)` when the model is
prepared; a layer that fits neither (Soft MoE, a PR-MoE residual, another expert kind
or dtype, a non-CPU device, no kernels) keeps its class. A fused layer is the same module with its
class swapped for `FusedDecodeLayer` (as torch.nn.utils.parametrize swaps classes):
parameters, state-dict keys and `isinstance(m, MoELayer)` stay as they were. Its
forward runs the kernel for calls of 1..FUSED_MAX_TOKENS float32 tokens under no_grad, and MoELayer's staged forward (the reference, tests/test_decode.py) for
everything else. `unfuse(layer)` restores the class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moekit.moe.experts import ExpertBank, SharedExperts
from moekit.moe.layer import MoELayer
from moekit.moe.router.topk_sigmoid import TopKSigmoidRouter
from moekit.moe.router.topk_softmax import TopKSoftmaxRouter
from moekit.moe.types import DispatchPlan, MoEOutput, Routing
from moekit.ops import decode_ffn, ext

# tokens up to which a step is fused: every weight row is then read once for up to 8
# rows (an expert has at most one row per token), 16 vector accumulators
FUSED_MAX_TOKENS = 8


@dataclass(frozen=True)
class Fusion:
    kind: str  # "layer" or "experts"
    random_in_training: bool  # jitter or expert dropout: training-mode calls stay staged


def fusion_for(layer: MoELayer) -> Fusion | None:
    """How this layer's decode steps can be fused, or None (see the module docstring)."""
    cfg, experts, shared = layer.cfg, layer.experts, layer.shared
    if layer.mixes_tokens or layer.residual is not None or type(experts) is not ExpertBank or experts.impl != "cpu":
        return None
    if experts.act.name != "swiglu" or experts.w_in.dtype != torch.float32 or not ext.available():
        return None
    if shared is not None and (type(shared) is not SharedExperts or shared.ffn.act.name != "swiglu"
                               or shared.ffn.w_in.dtype != torch.float32):
        return None
    random = cfg.jitter_eps > 0 or cfg.expert_dropout > 0
    r = layer.router
    topk = type(r) in (TopKSoftmaxRouter, TopKSigmoidRouter) and cfg.dispatch == "dropless"
    if topk and r.weight.dtype == torch.float32 and (r.bias is None or r.bias.dtype == torch.float32):
        return Fusion("layer", random)
    return Fusion("experts", random)


def fuse(layer: MoELayer) -> bool:
    """Swap the layer's class for FusedDecodeLayer if its decode steps can be fused."""
    fusion = fusion_for(layer)
    if fusion is None or type(layer) is not MoELayer:
        return False
    layer.fusion = fusion
    layer.__class__ = FusedDecodeLayer
    return True


def unfuse(layer: MoELayer) -> None:
    if type(layer) is FusedDecodeLayer:
        layer.__class__ = MoELayer
        del layer.fusion


def _ffn(layer: MoELayer) -> decode_ffn.DecodeFFN:
    s = layer.shared
    if s is None:
        return decode_ffn.DecodeFFN(layer.experts.w_in, layer.experts.w_out)
    gate = None if s.gate is None else s.gate.weight.reshape(-1)
    return decode_ffn.DecodeFFN(layer.experts.w_in, layer.experts.w_out, s.ffn.w_in, s.ffn.w_out, gate)


def _router(layer: MoELayer) -> decode_ffn.DecodeRouter:
    r, cfg = layer.router, layer.cfg
    sigmoid = type(r) is TopKSigmoidRouter
    return decode_ffn.DecodeRouter(
        r.weight, r.bias, r.expert_bias if sigmoid else None, cfg.top_k, sigmoid, cfg.softmax_order == "after",
        cfg.normalize_topk, cfg.routed_scaling_factor, cfg.n_group if sigmoid else 1,
        cfg.topk_group if sigmoid else 1)


class FusedDecodeLayer(MoELayer):
    """An MoELayer whose decode steps run in one kernel call (see the module docstring)."""

    fusion: Fusion

    def forward(self, x: torch.Tensor, *, token_ids: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> MoEOutput:
        x_TD = self.flatten(x)
        if not self._decode_step(x_TD):
            return super().forward(x, token_ids=token_ids, mask=mask)
        if self.fusion.kind == "layer":
            s = decode_ffn.layer_step(x_TD, _router(self), _ffn(self))
            routing = Routing(s.expert_ids_TK, s.weights_TK, s.logits_TE, s.probs_TE)
            plan = DispatchPlan(token_idx_R=s.token_idx_R, slot_idx_R=s.slot_idx_R, weights_R=s.weights_R,
                                counts_E=s.counts_E, requested_E=s.counts_E, num_tokens=x_TD.shape[0],
                                top_k=s.expert_ids_TK.shape[1])
            return self.output(x, s.y_TD, routing, plan, mask)
        token_ids_T = None if token_ids is None else token_ids.reshape(-1)
        routing = self.router(x_TD, token_ids_T)
        plan = self.dispatch(routing, self.cfg)
        rows = decode_ffn.DecodeRows(plan.token_idx_R, plan.weights_R.to(torch.float32), plan.counts_E)
        return self.output(x, decode_ffn.experts_step(x_TD, rows, _ffn(self)), routing, plan, mask)

    def _decode_step(self, x_TD: torch.Tensor) -> bool:
        """A few float32 CPU tokens, nothing to differentiate, no random draws."""
        if not 0 < x_TD.shape[0] <= FUSED_MAX_TOKENS or x_TD.dtype != torch.float32 or x_TD.device.type != "cpu":
            return False
        # a forward under grad mode may be a training step (of the router alone, say): staged
        return not torch.is_grad_enabled() and not (self.training and self.fusion.random_in_training)

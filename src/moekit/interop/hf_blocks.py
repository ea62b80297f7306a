"""One transformers MoE block <-> one MoELayer: the config and the weights.

Blocks: Mixtral `MixtralSparseMoeBlock`, Qwen2-MoE `Qwen2MoeSparseMoeBlock`, Qwen3-MoE
`Qwen3MoeSparseMoeBlock` (transformers 5 layout). Nothing here imports transformers:
configs are read by attribute (or dict key) and blocks by parameter name.

    HF block                                     MoELayer
    gate.weight                   (E, D)         router.weight
    experts.gate_up_proj          (E, 2F, D)     experts.w_in    ([gate | up], same layout)
    experts.down_proj             (E, D, F)      experts.w_out
    Qwen2-MoE only:
    shared_expert.gate_proj       (Fs, D)  ┐     shared.ffn.w_in (2Fs, D) = [gate ; up]
    shared_expert.up_proj         (Fs, D)  ┘
    shared_expert.down_proj       (D, Fs)        shared.ffn.w_out
    shared_expert_gate.weight     (1, D)         shared.gate.weight   (sigmoid gate)

Routing: all three take softmax over every expert, then the top-k probabilities
(router "topk_softmax", softmax_order "before"); Mixtral renormalises the k weights,
Qwen2-/Qwen3-MoE only when norm_topk_prob (False by default in both configs).
"""

from __future__ import annotations

from typing import Any

import torch

from moekit.moe.config import MoEConfig
from moekit.moe.layer import MoELayer

# HF hidden_act of a gated expert -> moekit expert kind (act(gate) * up)
_GATED_KIND = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}


def _get(hf_config: Any, key: str, default: Any = None) -> Any:
    if isinstance(hf_config, dict):
        return hf_config.get(key, default)
    return getattr(hf_config, key, default)


def _require(hf_config: Any, key: str) -> Any:
    v = _get(hf_config, key)
    if v is None:
        raise ValueError(f"HF config has no {key!r}; cannot build an MoEConfig from it")
    return v


def _expert_kind(hf_config: Any) -> str:
    act = _get(hf_config, "hidden_act", "silu")
    if act not in _GATED_KIND:
        raise ValueError(f"HF config hidden_act={act!r} is not supported: valid {sorted(_GATED_KIND)}")
    return _GATED_KIND[act]


def moe_config_from_mixtral(hf_config: Any, **overrides: Any) -> MoEConfig:
    """MixtralConfig -> MoEConfig of one sparse MoE block (Jiang et al. 2024)."""
    kw = dict(
        d_model=_require(hf_config, "hidden_size"),
        num_experts=_require(hf_config, "num_local_experts"),
        top_k=_require(hf_config, "num_experts_per_tok"),
        d_ff=_require(hf_config, "intermediate_size"),
        router="topk_softmax", softmax_order="before", normalize_topk=True,
        jitter_eps=float(_get(hf_config, "router_jitter_noise", 0.0) or 0.0),
        expert=_expert_kind(hf_config),
        # HF adds the Switch loss only when output_router_logits is set
        aux_loss_coef=float(_get(hf_config, "router_aux_loss_coef", 0.0))
        if _get(hf_config, "output_router_logits", False) else 0.0,
    )
    kw.update(overrides)
    return MoEConfig(**kw)


def moe_config_from_qwen2_moe(hf_config: Any, **overrides: Any) -> MoEConfig:
    """Qwen2MoeConfig -> MoEConfig: softmax then top-k, no renormalisation unless
    norm_topk_prob, one shared expert scaled by a per-token sigmoid gate."""
    shared_ff = int(_get(hf_config, "shared_expert_intermediate_size", 0) or 0)
    kw = _qwen_common(hf_config, default_norm=False)
    kw.update(num_shared_experts=1 if shared_ff else 0, shared_d_ff=shared_ff or None,
              shared_gate=bool(shared_ff))
    kw.update(overrides)
    return MoEConfig(**kw)


def moe_config_from_qwen3_moe(hf_config: Any, **overrides: Any) -> MoEConfig:
    """Qwen3MoeConfig -> MoEConfig: Qwen2-MoE routing without the shared expert."""
    kw = _qwen_common(hf_config, default_norm=False)
    kw.update(overrides)
    return MoEConfig(**kw)


def _qwen_common(hf_config: Any, default_norm: bool) -> dict[str, Any]:
    return dict(
        d_model=_require(hf_config, "hidden_size"),
        num_experts=_require(hf_config, "num_experts"),
        top_k=_require(hf_config, "num_experts_per_tok"),
        d_ff=_require(hf_config, "moe_intermediate_size"),
        router="topk_softmax", softmax_order="before",
        normalize_topk=bool(_get(hf_config, "norm_topk_prob", default_norm)),
        expert=_expert_kind(hf_config),
        aux_loss_coef=float(_get(hf_config, "router_aux_loss_coef", 0.0))
        if _get(hf_config, "output_router_logits", False) else 0.0,
    )


# ---------------------------------------------------------------- weights

def _routed_pairs(layer: MoELayer, block: torch.nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    return [("gate.weight", layer.router.weight, block.gate.weight),
            ("experts.gate_up_proj", layer.experts.w_in, block.experts.gate_up_proj),
            ("experts.down_proj", layer.experts.w_out, block.experts.down_proj)]


def _shared_pairs(layer: MoELayer, block: torch.nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    if layer.shared is None or layer.shared.gate is None:
        raise ValueError("MoELayer has no gated shared expert; build it with moe_config_from_qwen2_moe")
    se = block.shared_expert
    w_in_hf = torch.cat([se.gate_proj.weight, se.up_proj.weight], dim=0)  # [gate ; up]
    return [("shared_expert.{gate,up}_proj", layer.shared.ffn.w_in, w_in_hf),
            ("shared_expert.down_proj", layer.shared.ffn.w_out, se.down_proj.weight),
            ("shared_expert_gate.weight", layer.shared.gate.weight, block.shared_expert_gate.weight)]


def _check_layer(layer: MoELayer) -> None:
    c = layer.cfg
    if c.router != "topk_softmax" or c.softmax_order != "before" or c.router_bias:
        raise ValueError(f"MoELayer router {c.router!r} (softmax_order={c.softmax_order!r}, "
                         f"router_bias={c.router_bias}) cannot hold an HF softmax top-k gate; "
                         "build it from the HF config (moe_config_from_*)")


@torch.no_grad()
def _copy(pairs, to_layer: bool | None) -> None:
    """Check every shape, then copy HF -> layer (to_layer) or layer -> HF; None: check only."""
    for name, ours, theirs in pairs:
        if ours.shape != theirs.shape:
            raise ValueError(f"HF {name} has shape {tuple(theirs.shape)}; the MoELayer expects "
                             f"{tuple(ours.shape)}")
    if to_layer is None:
        return
    for _, ours, theirs in pairs:
        (ours if to_layer else theirs).copy_(theirs if to_layer else ours)


def load_mixtral_block(layer: MoELayer, block: torch.nn.Module) -> MoELayer:
    """Copy a MixtralSparseMoeBlock's weights into layer (in place); returns layer."""
    _check_layer(layer)
    _copy(_routed_pairs(layer, block), to_layer=True)
    return layer


def load_qwen3_moe_block(layer: MoELayer, block: torch.nn.Module) -> MoELayer:
    """Copy a Qwen3MoeSparseMoeBlock's weights into layer (in place); returns layer."""
    return load_mixtral_block(layer, block)


def load_qwen2_moe_block(layer: MoELayer, block: torch.nn.Module) -> MoELayer:
    """Copy a Qwen2MoeSparseMoeBlock's weights (routed and shared) into layer."""
    _check_layer(layer)
    _copy(_routed_pairs(layer, block) + _shared_pairs(layer, block), to_layer=True)
    return layer


@torch.no_grad()
def store_mixtral_block(layer: MoELayer, block: torch.nn.Module) -> torch.nn.Module:
    """The other way: write layer's weights into an HF Mixtral/Qwen3-MoE block."""
    _check_layer(layer)
    _copy(_routed_pairs(layer, block), to_layer=False)
    return block


@torch.no_grad()
def store_qwen2_moe_block(layer: MoELayer, block: torch.nn.Module) -> torch.nn.Module:
    """Write layer's weights into an HF Qwen2MoeSparseMoeBlock (shared w_in split in two)."""
    _check_layer(layer)
    pairs = _routed_pairs(layer, block) + _shared_pairs(layer, block)
    _copy(pairs, to_layer=None)  # every shape checked before anything is written
    _copy(pairs[:3] + pairs[4:], to_layer=False)
    se, w_in = block.shared_expert, layer.shared.ffn.w_in
    Fs = se.gate_proj.weight.shape[0]
    se.gate_proj.weight.copy_(w_in[:Fs])
    se.up_proj.weight.copy_(w_in[Fs:])
    return block

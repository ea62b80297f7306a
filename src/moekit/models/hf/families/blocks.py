"""One transformers MoE block <-> one MoELayer: the weights (transformers 5 layout).

    HF block                                     MoELayer
    gate.weight                   (E, D)         router.weight
    experts.gate_up_proj          (E, 2F, D)     experts.w_in    ([gate | up], same layout)
    experts.down_proj             (E, D, F)      experts.w_out
    with a gated shared expert (Qwen2-MoE):
    shared_expert.gate_proj       (Fs, D)  ┐     shared.ffn.w_in (2Fs, D) = [gate ; up]
    shared_expert.up_proj         (Fs, D)  ┘
    shared_expert.down_proj       (D, Fs)        shared.ffn.w_out
    shared_expert_gate.weight     (1, D)         shared.gate.weight   (sigmoid gate)

Nothing here imports transformers: blocks are read by parameter name. The family files
(mixtral.py, qwen2_moe.py, qwen3_moe.py) hold the config side of their block.
"""

from __future__ import annotations

import torch

from moekit.moe.layer import MoELayer


def routed_pairs(layer: MoELayer, block: torch.nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    return [("gate.weight", layer.router.weight, block.gate.weight),
            ("experts.gate_up_proj", layer.experts.w_in, block.experts.gate_up_proj),
            ("experts.down_proj", layer.experts.w_out, block.experts.down_proj)]


def shared_pairs(layer: MoELayer, block: torch.nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    if layer.shared is None or layer.shared.gate is None:
        raise ValueError("MoELayer has no gated shared expert; build it with moe_config_from_qwen2_moe")
    se = block.shared_expert
    w_in_hf = torch.cat([se.gate_proj.weight, se.up_proj.weight], dim=0)  # [gate ; up]
    return [("shared_expert.{gate,up}_proj", layer.shared.ffn.w_in, w_in_hf),
            ("shared_expert.down_proj", layer.shared.ffn.w_out, se.down_proj.weight),
            ("shared_expert_gate.weight", layer.shared.gate.weight, block.shared_expert_gate.weight)]


def check_layer(layer: MoELayer) -> None:
    c = layer.cfg
    if c.router != "topk_softmax" or c.softmax_order != "before" or c.router_bias:
        raise ValueError(f"MoELayer router {c.router!r} (softmax_order={c.softmax_order!r}, "
                         f"router_bias={c.router_bias}) cannot hold an HF softmax top-k gate; "
                         "build it from the HF config (moe_config_from_*)")


@torch.no_grad()
def copy_pairs(pairs, to_layer: bool | None) -> None:
    """Check every shape, then copy HF -> layer (to_layer) or layer -> HF; None: check only."""
    for name, ours, theirs in pairs:
        if ours.shape != theirs.shape:
            raise ValueError(f"HF {name} has shape {tuple(theirs.shape)}; the MoELayer expects "
                             f"{tuple(ours.shape)}")
    if to_layer is None:
        return
    for _, ours, theirs in pairs:
        (ours if to_layer else theirs).copy_(theirs if to_layer else ours)


def load_routed(layer: MoELayer, block: torch.nn.Module) -> MoELayer:
    """Copy a routed-only block's weights (gate, experts) into layer, in place."""
    check_layer(layer)
    copy_pairs(routed_pairs(layer, block), to_layer=True)
    return layer


@torch.no_grad()
def store_routed(layer: MoELayer, block: torch.nn.Module) -> torch.nn.Module:
    """Write layer's router and experts into a routed-only HF block, in place."""
    check_layer(layer)
    copy_pairs(routed_pairs(layer, block), to_layer=False)
    return block

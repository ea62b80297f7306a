"""Get a built model ready for inference, from outside: `prepare_for_inference(model)`.

Generation and serving call it once before decoding. It
  - fuses each MoE layer's decode step into one kernel call where it can
    (inference/fused_decode.py: the class of the layer is swapped, nothing else changes);
  - makes the expert banks' inference-only data (the CPU wing's packed weights for its
    rows kernel, moe/experts/cpu/packed.py), which a training forward or a change of
    the weights drops again.
What it did is returned, layer by layer, so a caller can print or test it.
`restore(model)` undoes the swaps.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moekit.inference.fused_decode import FusedDecodeLayer, fuse, unfuse
from moekit.moe.experts import ExpertBank
from moekit.moe.layer import MoELayer


@dataclass(frozen=True)
class Prepared:
    fused: dict[str, str]  # layer name -> fusion kind ("layer" or "experts")
    packed: list[str]  # banks whose weights were packed


def prepare_for_inference(model: nn.Module) -> Prepared:
    fused, packed = {}, []
    for name, m in model.named_modules():
        if isinstance(m, MoELayer) and (type(m) is FusedDecodeLayer or fuse(m)):
            fused[name] = m.fusion.kind
        if isinstance(m, ExpertBank):
            m.prepare_for_inference()
            if m.cpu_state.packed is not None:
                packed.append(name)
    return Prepared(fused, packed)


def restore(model: nn.Module) -> None:
    """Undo prepare_for_inference: staged MoE layers, no packed weights."""
    for m in model.modules():
        if isinstance(m, MoELayer):
            unfuse(m)
        if isinstance(m, ExpertBank):
            m.cpu_state.packed = None

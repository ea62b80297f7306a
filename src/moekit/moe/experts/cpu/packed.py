"""Expert weights packed for the inference forward in rows (ops/csrc/expert_bank_rows.cpp).

That kernel broadcasts token rows and loads the weight as 16-wide vectors of its
transposed columns, so it wants each expert's Wᵀ cut into panels, each contiguous:
  W_in (E, 2F, D) -> panels (D, 32·gv): gv vectors of gate columns, then the same up
      columns (gv = GATE_VECTORS, the last panel 1 when F/16 is odd), so that a panel's
      tile holds both halves of the SwiGLU for the same columns;
  W_out (E, D, F) -> panels (F, 16·nv): nv vectors of output columns (nv = OUT_VECTORS,
      the last panel what is left).
The panels of an expert follow each other; the kernel walks them in that order.

The copy costs the experts' weights' memory once more (96 MiB for benchmarks/layer.py's
`many` layer, 264 MiB for `fine`), so it is made only when asked:
`moekit.inference.prepare_for_inference(model)` (generation and serving call it) packs
every bank whose path can use it. A packed copy records the weights' version counters
and storage: once the weights change (an optimizer step, load_state_dict's copy_) it no
longer matches, the bank drops it and runs on the weights as they lie.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GATE_VECTORS = 2  # ops/csrc/expert_bank_rows.cpp: GV
OUT_VECTORS = 4   # ops/csrc/gemm_rows.h: NV_MAX


def _groups(vectors: int, most: int) -> list[tuple[int, int]]:
    """(first column, last column + 1) of each panel over `vectors` 16-wide vectors."""
    return [(16 * v, 16 * min(vectors, v + most)) for v in range(0, vectors, most)]


def pack_in(w_in_END: torch.Tensor) -> torch.Tensor:
    """(E, 2F, D) -> (E, 2F·D): W_inᵀ in gate/up panels."""
    E, N, D = w_in_END.shape
    F = N // 2
    gate, up = w_in_END[:, :F], w_in_END[:, F:]
    panels = [torch.cat([gate[:, c0:c1], up[:, c0:c1]], dim=1).transpose(1, 2).reshape(E, -1)
              for c0, c1 in _groups(F // 16, GATE_VECTORS)]
    return torch.cat(panels, dim=1).contiguous()


def pack_out(w_out_EDF: torch.Tensor) -> torch.Tensor:
    """(E, D, F) -> (E, F·D): W_outᵀ in panels of output columns."""
    E, D, F = w_out_EDF.shape
    panels = [w_out_EDF[:, c0:c1].transpose(1, 2).reshape(E, -1) for c0, c1 in _groups(D // 16, OUT_VECTORS)]
    return torch.cat(panels, dim=1).contiguous()


@dataclass(frozen=True)
class Packed:
    p_in: torch.Tensor  # (E, 2F·D)
    p_out: torch.Tensor  # (E, F·D)
    key: tuple  # the weights' storage, version counters and shapes when packed

    def matches(self, w_in_END: torch.Tensor, w_out_EDF: torch.Tensor) -> bool:
        return self.key == _key(w_in_END, w_out_EDF)


def _key(w_in: torch.Tensor, w_out: torch.Tensor) -> tuple:
    # in-place updates (optimizer steps, load_state_dict's copy_) bump _version; a new
    # storage changes data_ptr
    return (w_in.data_ptr(), w_in._version, tuple(w_in.shape), w_out.data_ptr(), w_out._version,
            tuple(w_out.shape))


@torch.no_grad()
def pack(w_in_END: torch.Tensor, w_out_EDF: torch.Tensor) -> Packed:
    return Packed(pack_in(w_in_END.detach()), pack_out(w_out_EDF.detach()), _key(w_in_END, w_out_EDF))

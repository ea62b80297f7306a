"""y[idx[j]] += src[j] over rows: csrc/rows.cpp (columns split between threads), with
torch's index_add_ as the reference and the fallback (other dtypes, devices, no build)."""

from __future__ import annotations

import torch

from moekit.ops import ext


def applies(y_TD: torch.Tensor, src_nD: torch.Tensor) -> bool:
    return (y_TD.device.type == "cpu" and y_TD.dtype == torch.float32 and src_nD.dtype == torch.float32
            and y_TD.dim() == 2 and y_TD.stride(1) == 1 and src_nD.stride(-1) == 1 and ext.available())


def index_add_(y_TD: torch.Tensor, idx_n: torch.Tensor, src_nD: torch.Tensor) -> torch.Tensor:
    if applies(y_TD, src_nD):
        ext.op("index_add_rows_")(y_TD, idx_n, src_nD)
        return y_TD
    return y_TD.index_add_(0, idx_n, src_nD)

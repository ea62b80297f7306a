"""Row combines of the expert bank on CPU (csrc/rows.cpp), each with its torch reference:

index_add_   y[idx[j]] += src[j] over rows (columns split between threads); torch's
             index_add_ is the reference and the fallback (other dtypes, devices, no build).
sum_slots    y[t] = Σ_k src[t·K + k], k in order: the combine when every routed row was
             written to its slot t·K + k; sum_slots_reference adds in the same order.
slot_buffer  the (T·K, D) buffer those rows are written to, reused from call to call.
"""

from __future__ import annotations

import torch

from moekit.ops import ext, grad_pool


def applies(y_TD: torch.Tensor, src_nD: torch.Tensor) -> bool:
    return (y_TD.device.type == "cpu" and y_TD.dtype == torch.float32 and src_nD.dtype == torch.float32
            and y_TD.dim() == 2 and y_TD.stride(1) == 1 and src_nD.stride(-1) == 1 and ext.available())


def index_add_(y_TD: torch.Tensor, idx_n: torch.Tensor, src_nD: torch.Tensor) -> torch.Tensor:
    if applies(y_TD, src_nD):
        ext.op("index_add_rows_")(y_TD, idx_n, src_nD)
        return y_TD
    return y_TD.index_add_(0, idx_n, src_nD)


def sum_slots(src_SD: torch.Tensor, K: int) -> torch.Tensor:
    """(T·K, D) -> (T, D): each token's K slot rows summed in the order k = 0, 1, ..."""
    if (src_SD.device.type == "cpu" and src_SD.dtype == torch.float32 and src_SD.is_contiguous()
            and ext.available()):
        return ext.op("sum_slots")(src_SD, K)
    return sum_slots_reference(src_SD, K)


def sum_slots_reference(src_SD: torch.Tensor, K: int) -> torch.Tensor:
    src_TKD = src_SD.view(-1, K, src_SD.shape[-1])
    y_TD = src_TKD[:, 0].clone()
    for k in range(1, K):
        y_TD += src_TKD[:, k]
    return y_TD


# Slot buffers from this size up are kept for the next call: a fresh one past glibc's
# mmap threshold (32 MiB; the "many" layer's is 64 MiB) is new pages that fault in on
# first write, every call. Smaller ones come from glibc's heap, already mapped.
MIN_POOLED_BYTES = 8 * 2**20
_pooled: dict[tuple, torch.Tensor] = {}


def slot_buffer(rows: int, width: int, like: torch.Tensor, zero: bool,
                min_pooled_bytes: int = MIN_POOLED_BYTES) -> torch.Tensor:
    """An uninitialised (rows, width) buffer like `like` (zeroed if `zero`). A big one (from
    min_pooled_bytes) is reused when nothing but this pool still holds it (the last call's
    sum is done)."""
    nbytes = rows * width * like.element_size()
    if nbytes < min_pooled_bytes or like.device.type != "cpu":
        return like.new_zeros(rows, width) if zero else like.new_empty(rows, width)
    key = (like.dtype, like.device)
    buf = _pooled.get(key)
    if buf is None or buf.numel() < rows * width or not grad_pool.only_pool_holds(buf):
        buf = _pooled[key] = like.new_empty(rows * width)
    out = buf[: rows * width].view(rows, width)
    return out.zero_() if zero else out


def release() -> None:
    """Drop the pooled slot buffers."""
    _pooled.clear()

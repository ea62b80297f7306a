"""Gradient buffers of the expert bank's stacked weights, reused from step to step (CPU).

Why: the expert weights are E times an FFN's, and so are their gradients (fine config:
276 MB a step). Training drops the gradients every step (zero_grad(set_to_none=True)),
so each backward would write them into fresh memory: a fresh glibc mapping whose 4 KiB
pages fault in one by one on first write. Measured on the "many" layer (E=128) under
torch.profiler, 4 steps: the copies into the gradients took 41-59 ms a step with fresh
buffers and 19-29 ms with reused ones. (Transparent huge pages, tried first, made those
copies slower, 80-105 ms: the kernel compacts memory to find each 2 MiB page.)

How: one buffer per parameter, held weakly (it goes when the parameter goes). A backward
asks for a gradient buffer; when nothing but the pool still references the previous one
(the optimizer step is over and p.grad was set to None, or autograd added it into an
existing p.grad), that memory is handed out again; otherwise a fresh buffer replaces it.
The tensor handed to autograd is a view of the buffer, so autograd adopts it as p.grad
without a copy.

Memory: a buffer stays allocated while its parameter lives; that is the size of the
gradient, which zero_grad(set_to_none=False) keeps too. `release()` drops every buffer;
`moekit.settings.use(grad_pool=False)` turns the pool off.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from moekit import settings

MIN_BYTES = 8 * 2**20  # smaller buffers come from glibc's heap, already mapped
_pool: WeakIdKeyDictionary = WeakIdKeyDictionary()
_use_count = getattr(torch._C, "_storage_Use_Count", None)  # private: without it, no reuse


def enabled() -> bool:
    return _use_count is not None and settings.get().grad_pool


def only_pool_holds(buf: torch.Tensor) -> bool:
    """Whether nothing but the pool's own reference holds buf's memory (False when the
    use count cannot be read: then nothing is reused). ops/rows.py's slot buffers ask too."""
    # references: buf itself, and the storage object made for this query
    return _use_count is not None and _use_count(buf.untyped_storage()._cdata) == 2


def empty_like(param: torch.Tensor, min_bytes: int = MIN_BYTES) -> torch.Tensor:
    """An uninitialised contiguous tensor like param, for its gradient; the backward
    must write every element. Gradients of min_bytes or more are pooled."""
    nbytes = param.numel() * param.element_size()
    if param.device.type != "cpu" or nbytes < min_bytes or not enabled():
        return torch.empty_like(param, memory_format=torch.contiguous_format)
    buf = _pool.get(param)
    if buf is None or buf.shape != param.shape or buf.dtype != param.dtype or not only_pool_holds(buf):
        buf = torch.empty_like(param, memory_format=torch.contiguous_format)
        _pool[param] = buf
    return buf.view(buf.shape)


def release() -> None:
    """Drop every pooled buffer (gradients still referenced elsewhere stay valid)."""
    _pool.clear()

"""Row-wise top-k expert ids for the routers: csrc/topk.cpp, with torch.topk as the reference.

The kernel serves CPU float32 scores of 2-D shape with at least MIN_ROWS rows and k <= KMAX
(why it beats torch.topk there is said in the .cpp); everything else (decode steps
included), or settings kernels="off", runs torch.topk. Both give
the ids largest first with NaN above every number. On ties the kernel keeps the lower
expert id (as `reference`, a stable sort, does); torch.topk promises no order on ties.
"""

from __future__ import annotations

import torch

from moekit.ops import ext

KMAX = 16  # the kernel's limit (csrc/topk.cpp)
# below this many rows torch.topk's smaller fixed cost wins (measured: 1-64 rows of 8-128
# experts, 2-5 us vs the kernel's 4-14 us; 8192 x 128, k = 4: 5.4 ms vs 1.2 ms)
MIN_ROWS = 128


def reference(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """The obviously-correct version: a stable descending sort, first k."""
    return torch.sort(scores_TE, dim=-1, descending=True, stable=True).indices[..., :k]


def applies(scores_TE: torch.Tensor, k: int, min_rows: int = MIN_ROWS) -> bool:
    return (scores_TE.device.type == "cpu" and scores_TE.dtype == torch.float32 and scores_TE.dim() == 2
            and scores_TE.shape[0] >= min_rows and 1 <= k <= min(KMAX, scores_TE.shape[1]) and ext.available())


def topk_ids(scores_TE: torch.Tensor, k: int, min_rows: int = MIN_ROWS) -> torch.Tensor:
    """(T, E) scores -> (T, k) int64 ids of the k largest, largest first (no gradient).
    min_rows: the fewest rows the kernel takes (tests pass 1 to run it on every shape)."""
    if applies(scores_TE, k, min_rows):
        return ext.op("topk_ids")(scores_TE.detach(), k)
    return torch.topk(scores_TE, k, dim=-1, sorted=True).indices

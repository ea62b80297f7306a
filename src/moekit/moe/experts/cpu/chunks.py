"""How the CPU expert paths walk expert-sorted rows: chunks of at most max_rows rows,
each a list of per-expert segments (chunked.py's loop, whole.py's C++ calls)."""

from __future__ import annotations

Segments = list[tuple[int, int, int]]  # (expert, row start, row end) inside a chunk


def plan_chunks(counts: list[int], max_rows: int, one_expert: bool = False
                ) -> list[tuple[int, int, Segments]]:
    """Split expert-sorted rows into chunks of at most max_rows rows; with one_expert,
    a chunk never holds rows of two experts (chunked.py: oneDNN's padded products)."""
    chunks: list[tuple[int, int, Segments]] = []
    segs: Segments = []
    r0 = n = 0
    for e, c in enumerate(counts):
        while c > 0:
            take = min(c, max_rows - n)
            segs.append((e, n, n + take))
            n, c = n + take, c - take
            if n == max_rows or (one_expert and c == 0):
                chunks.append((r0, r0 + n, segs))
                r0, n, segs = r0 + n, 0, []
    if n:
        chunks.append((r0, r0 + n, segs))
    return chunks

"""training/heap.py sets glibc's mmap and trim thresholds. Each case runs in a fresh,
minimal interpreter (ctypes only, heap.py loaded from its file): the thresholds are
process-wide, cannot be unset, and glibc adjusts them itself as a process frees memory,
so only a process without history shows the defaults."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from moekit.training import heap

# prints: is a 4 MiB block served from the brk heap (below the program break) rather
# than by its own mmap; does the break stay put after 4 MiB of 64 KiB blocks are freed
PROBE = textwrap.dedent("""
    import ctypes, importlib.util, sys
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.sbrk.restype, libc.sbrk.argtypes = ctypes.c_void_p, [ctypes.c_long]
    if sys.argv[1] == "1":
        spec = importlib.util.spec_from_file_location("heap", sys.argv[2])
        heap = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(heap)
        assert heap.keep_freed_memory()
    small = [libc.malloc(64 << 10) for _ in range(64)]
    brk = libc.sbrk(0)
    for p in reversed(small):
        libc.free(p)
    kept = libc.sbrk(0) == brk
    big = libc.malloc(4 << 20)  # after the trim probe: freeing an mmap()ed block raises both thresholds
    print(int(big < libc.sbrk(0)), int(kept))
""")


def _probe(keep: bool) -> tuple[int, int]:
    env = {k: v for k, v in os.environ.items() if k not in heap._ENV}
    out = subprocess.run([sys.executable, "-c", PROBE, "1" if keep else "0", heap.__file__], env=env,
                         capture_output=True, text=True, timeout=60, check=True)
    a, b = out.stdout.split()
    return int(a), int(b)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_sets_the_mmap_and_trim_thresholds():
    assert _probe(False) == (0, 0), "glibc's defaults: 4 MiB gets its own mmap, the freed top is trimmed"
    assert _probe(True) == (1, 1), "kept: 4 MiB comes from the heap, the freed top stays"


def test_leaves_the_users_setting_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert heap.keep_freed_memory() is False

"""Pick the fastest of a few kernels by timing them once per machine and shape class.

Why: the fastest matrix-product engine depends on the CPU. On an AMD EPYC with AVX-512
oneDNN ran fp32 products at ~2x MKL's speed; on an Intel Xeon, MKL's decode mat-vecs
ran 2.5x oneDNN's; on an AVX2 EPYC (Zen 1) the two tie on big products and oneDNN
loses on small ones (`python benchmarks/gemm.py` prints all three on the machine at
hand). So every "auto" choice between kernels that compute the same thing is made by
timing the candidates on the call's own shape class, once, and remembering the winner:

    tune.pick("gemm f32 256x704x1024", {"onednn": make_a, "torch": make_b}) -> "onednn"

(each `make_*` returns the call to time; it is only made when a measurement is due)

The winners are kept in memory and in a JSON file per machine (<settings.cache_dir>/tune/,
keyed by the CPU, torch's version, the kernel build and the thread count), written
atomically, so a process pays for a shape class once and later processes not at all.
With `settings.tune == "rules"` nothing is timed and the first candidate (the rule's
choice) wins: deterministic across machines, as the test suite runs.
`moekit kernels` prints the file; deleting it re-measures.

A choice never changes the maths, only the summation order (so results differ by
rounding between two machines, not between two runs on one machine).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from moekit import settings

REPEATS = 3  # timed calls per candidate after one warm-up; the median wins
_memory: dict[tuple[str, str], str] = {}  # (file, key) -> winner
_loaded: dict[str, bool] = {}


def cache_file() -> Path:
    from moekit.ops import ext

    build = ext.loaded_build() or "nokernels"
    key = f"{ext.build_tag('native')}-{build}-torch{torch.__version__}"
    root = Path(settings.get().cache_dir) if settings.get().cache_dir else Path.home() / ".cache" / "moekit"
    return root / "tune" / f"{key}.json"


def pick(key: str, candidates: dict[str, Callable[[], Callable[[], object]]]) -> str:
    """The name of the fastest candidate for this shape class (the first under rules)."""
    names = list(candidates)
    if len(names) == 1 or settings.get().tune == "rules":
        return names[0]
    key = f"{key} t{torch.get_num_threads()}"
    path = cache_file()
    _load(path)
    won = _memory.get((str(path), key))
    if won in candidates:
        return won
    times = {name: _time(make()) for name, make in candidates.items()}
    won = min(times, key=times.get)
    _memory[(str(path), key)] = won
    _save(path, key, won, times)
    return won


def _time(fn: Callable[[], object]) -> float:
    fn()
    runs = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def _load(path: Path) -> None:
    if _loaded.get(str(path)):
        return
    _loaded[str(path)] = True
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        _memory.update({(str(path), k): v["won"] for k, v in data.get("choices", {}).items() if isinstance(v, dict)})
    except (OSError, ValueError, AttributeError):  # no file yet, or a damaged one: measure again
        pass


def _save(path: Path, key: str, won: str, times: dict[str, float]) -> None:
    """Merge this choice into the file (read, update, write a temp file, replace)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {}
        choices = data.setdefault("choices", {})
        choices[key] = {"won": won, "seconds": {k: round(v, 7) for k, v in times.items()}}
        data["cpu"] = cpu_name()
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:  # a read-only home: keep the choice in memory only
        pass


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def forget() -> None:
    """Drop the in-memory choices (the file stays; tests and `moekit kernels --retune`)."""
    _memory.clear()
    _loaded.clear()

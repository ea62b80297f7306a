"""moekit's C++ kernels (ops/csrc/*.cpp): one torch extension, built on first use.

torch.utils.cpp_extension compiles the sources into torch's extension cache (about
15 s, once per machine and source version) and registers their ops under
torch.ops.moekit. Every kernel has a torch reference beside it (ops/rowmv.py,
ops/topk.py, ops/swiglu.py, ops/rows.py) that runs instead where the kernel cannot: no compiler,
MOEKIT_EXT=0, another dtype or device, or autograd needing a formula the kernel
lacks. A failed build warns once and leaves the references in charge.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path

import torch

SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.cpp"))
# torch rebuilds when a source or a flag changes, not a header: a hash of the headers
# goes into the flags so that editing one rebuilds too
HEADERS = sorted((Path(__file__).parent / "csrc").glob("*.h"))
_state: dict[str, bool] = {}  # "built": whether torch.ops.moekit holds the kernels


def available() -> bool:
    """Whether the kernels are built (building them on the first call)."""
    if "built" not in _state:
        _state["built"] = False
        if os.environ.get("MOEKIT_EXT", "1") != "0":
            try:
                from torch.utils import cpp_extension

                _say_if_building(cpp_extension)
                cpp_extension.load(name="moekit_ext", sources=[str(s) for s in SOURCES],
                                   is_python_module=False,
                                   extra_cflags=["-O3", "-march=native", "-fopenmp", _headers_flag()],
                                   extra_ldflags=["-fopenmp"])
                _state["built"] = True
            except Exception as e:  # no compiler, no headers: the references still work
                warnings.warn(f"moekit: the C++ kernels did not build ({type(e).__name__}: "
                              f"{str(e)[:200]}); using the torch references", stacklevel=3)
    return _state["built"]


def _headers_flag() -> str:
    digest = hashlib.sha256(b"".join(h.read_bytes() for h in HEADERS)).hexdigest()[:16]
    return f"-DMOEKIT_HEADERS={digest}"


def _say_if_building(cpp_extension) -> None:
    """One line on stderr when nothing is built yet, so a first run's pause is explained."""
    try:
        built = Path(cpp_extension._get_build_directory("moekit_ext", verbose=False), "moekit_ext.so")
    except Exception:  # a private helper: if it moves, just say nothing
        return
    if not built.exists():
        print("moekit: compiling its C++ kernels (first use on this machine, ~15 s)", file=sys.stderr, flush=True)


def op(name: str):
    """torch.ops.moekit.<name> if the kernels are built, else None."""
    return getattr(torch.ops.moekit, name) if available() else None

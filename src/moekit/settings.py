"""Process-wide switches of moekit's speed machinery, in one frozen value.

    from moekit import settings
    settings.get()                          # the current Settings
    with settings.use(kernels="off"): ...   # a block with other settings
    settings.set(gemm="torch")              # for the rest of the process

Every field has a default that is the fast, correct choice; the others exist for
debugging, for benchmarks that compare paths, and for tests, which pass values instead
of patching module globals. A field that names a variant is checked when set (an
unknown value lists the valid ones).

kernels   which build of the C++ kernels (ops/ext.py) moekit uses: "native" (compiled for
          this CPU), "x86-64-v3" (AVX2 + FMA, what a CPU without AVX-512 runs: the CI's
          portable mode), or "off" (torch references only, as a machine without a
          compiler runs). The one environment variable moekit reads, MOEKIT_KERNELS,
          sets its starting value, so a whole process (a CI job, `pytest`) can be run
          in one mode. A process builds or loads one kernel build: switching between
          "native" and "x86-64-v3" after the first kernel call is refused.
gemm      how ops/gemm.py picks a matrix-product kernel on the CPU: "auto" (measured per
          machine and shape class, ops/tune.py), "onednn" (oneDNN wherever it applies),
          "torch" (torch's own call, i.e. MKL or OpenBLAS: the reference).
tune      "measure": auto choices are timed once per machine and shape class and cached
          on disk (ops/tune.py); "rules": fixed rules, nothing timed (deterministic
          choices across machines; the test suite runs this way).
attention_kernel   the fused RoPE + causal attention kernel for short fp32 sequences.
grad_pool          reuse the expert weights' gradient buffers (ops/grad_pool.py).
cache_dir where measured choices are kept ("" = ~/.cache/moekit).
cpu_path  field overrides for the CPU expert path the layer picks
          (moe/experts/cpu/path.py: CpuPath), e.g. {"kernel": "chunked"}: what
          benchmarks/ab.py compares. Empty: every field as chosen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

KERNELS = ("native", "x86-64-v3", "off")
GEMMS = ("auto", "onednn", "torch")
TUNES = ("measure", "rules")
ENV = "MOEKIT_KERNELS"


@dataclass(frozen=True)
class Settings:
    kernels: str = "native"
    gemm: str = "auto"
    tune: str = "measure"
    attention_kernel: bool = True
    grad_pool: bool = True
    cache_dir: str = ""
    cpu_path: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        for name, valid in (("kernels", KERNELS), ("gemm", GEMMS), ("tune", TUNES)):
            if getattr(self, name) not in valid:
                raise ValueError(f"moekit settings: {name}={getattr(self, name)!r} is not one of "
                                 f"{', '.join(valid)}")
        for name in ("attention_kernel", "grad_pool"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"moekit settings: {name}={getattr(self, name)!r} must be True or False")
        if not isinstance(self.cpu_path, (dict, MappingProxyType)):
            raise ValueError(f"moekit settings: cpu_path={self.cpu_path!r} must be a dict of CpuPath fields")
        if isinstance(self.cpu_path, dict):
            object.__setattr__(self, "cpu_path", MappingProxyType(dict(self.cpu_path)))
        if self.cpu_path:
            from moekit.moe.experts.cpu.path import check_overrides

            check_overrides(dict(self.cpu_path))


def _from_env() -> Settings:
    value = os.environ.get(ENV, "native").strip().lower()
    if value not in KERNELS:
        raise ValueError(f"{ENV}={value!r} is not one of {', '.join(KERNELS)}")
    return Settings(kernels=value)


_current: Settings = _from_env()


def get() -> Settings:
    return _current


def set(**changes: Any) -> Settings:  # noqa: A001  (moekit.settings.set reads well)
    """Change fields for the rest of the process; returns the new Settings."""
    global _current
    new = dataclasses.replace(_current, **changes)
    _check_kernel_switch(_current, new)
    _current = new
    return new


@contextlib.contextmanager
def use(**changes: Any) -> Iterator[Settings]:
    """with settings.use(gemm="torch"): ... runs the block with these fields changed."""
    global _current
    old = _current
    new = dataclasses.replace(old, **changes)
    _check_kernel_switch(old, new)
    _current = new
    try:
        yield new
    finally:
        _current = old


def _check_kernel_switch(old: Settings, new: Settings) -> None:
    """A loaded kernel build cannot be swapped for another in the same process."""
    if old.kernels == new.kernels or "off" in (old.kernels, new.kernels):
        return
    from moekit.ops import ext

    loaded = ext.loaded_build()
    if loaded is not None and loaded != new.kernels:
        raise ValueError(f"moekit settings: kernels={new.kernels!r}, but this process already loaded the "
                         f"{loaded!r} build; start a new process (e.g. {ENV}={new.kernels})")

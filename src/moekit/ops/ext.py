"""moekit's C++ kernels (ops/csrc/*.cpp): one torch extension, built on first use.

torch.utils.cpp_extension compiles the sources into torch's extension cache and
registers their ops under torch.ops.moekit. Every op has a typed Python face in ops/
with a torch reference beside it, which runs where the kernel cannot: settings
kernels="off", no compiler, another dtype or device, or autograd needing a formula the
kernel lacks.

Which build: `settings.kernels` (moekit/settings.py). "native" compiles for this CPU;
"x86-64-v3" for any x86 CPU with AVX2 and FMA (what a laptop without AVX-512 runs).
The build folder is named after the target (for "native": the machine, torch's CPU
capability and the CPU's feature flags), so a cache shared between machines never
hands one CPU another's instructions (SIGILL). Kernels that need AVX-512 sit behind
`#ifdef __AVX512F__` in their sources; other builds compile without them and
`caps()` says which ops exist.

Failure modes handled here:
- A build killed half-way leaves torch's `lock` file behind, and torch waits on it
  forever. moekit holds its own OS lock (released by the OS when a process dies) around
  every build, and under it removes a `lock` file no live builder can own.
- A build that fails is recorded (the compiler's message in `failed.txt` in the build
  folder); later processes skip it with one warning until the sources or flags change.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from moekit import settings

CSRC = Path(__file__).parent / "csrc"
SOURCES = sorted(CSRC.glob("*.cpp"))
# torch rebuilds when a source or a flag changes, not a header: a hash of the headers
# goes into the flags so that editing one rebuilds too
HEADERS = sorted(CSRC.glob("*.h"))
_state: dict[str, object] = {}  # "build": the loaded build's name, or None after a failure


def available() -> bool:
    """Whether the kernels of the current `settings.kernels` build are loaded (building
    them on the first call); always False with kernels="off"."""
    want = settings.get().kernels
    if want == "off":
        return False
    if "build" not in _state:
        _state["build"] = want if _load(want) else None
    return _state["build"] == want


def loaded_build() -> str | None:
    """The build this process loaded ("native" or "x86-64-v3"), or None."""
    return _state.get("build")  # type: ignore[return-value]


def op(name: str):
    """torch.ops.moekit.<name> if the kernels are built, else None."""
    return getattr(torch.ops.moekit, name) if available() else None


@dataclass(frozen=True)
class Caps:
    """What this process's kernel build can run (read once, after the build)."""

    built: bool  # the portable kernels (every op but the AVX-512 ones)
    avx512: bool  # the AVX-512 expert-bank kernels (expert_bank_cols.cpp, expert_bank_rows.cpp)


def caps() -> Caps:
    if not available():
        return Caps(False, False)
    key = ("caps", loaded_build())
    if key not in _state:
        _state[key] = Caps(True, bool(torch.ops.moekit.expert_bank_cols_built(torch.empty(0))))
    return _state[key]  # type: ignore[return-value]


# ----------------------------------------------------------------------------- building


def arch_flags(kind: str) -> list[str]:
    machine = platform.machine().lower()
    if kind == "x86-64-v3":
        if machine not in ("x86_64", "amd64"):
            raise ValueError(f"moekit settings: kernels='x86-64-v3' targets x86 CPUs; this machine is {machine!r} "
                             "(use 'native' or 'off')")
        return ["-march=x86-64-v3"]
    if machine in ("x86_64", "amd64"):
        return ["-march=native"]
    if machine in ("aarch64", "arm64"):
        return ["-mcpu=native"]
    return []


def build_tag(kind: str) -> str:
    """A name for the build target: the same on machines that can share the binary."""
    if kind != "native":
        return kind.replace("-", "_")
    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith(("flags", "Features")):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                break
    ident = "|".join([platform.machine(), torch.backends.cpu.get_cpu_capability(), flags or platform.processor()])
    return "native_" + hashlib.sha256(ident.encode()).hexdigest()[:12]


def _cflags(kind: str) -> list[str]:
    digest = hashlib.sha256(b"".join(h.read_bytes() for h in HEADERS)).hexdigest()[:16]
    return ["-O3", *arch_flags(kind), "-fopenmp", f"-DMOEKIT_HEADERS={digest}"]


def _load(kind: str) -> bool:
    try:
        from torch.utils import cpp_extension

        name = "moekit_ext_" + build_tag(kind)
        folder = Path(cpp_extension._get_build_directory(name, verbose=False))
        cflags = _cflags(kind)
    except Exception as e:  # noqa: BLE001  (an unknown machine or a torch without cpp_extension)
        _warn(f"the C++ kernels cannot be built here ({type(e).__name__}: {str(e)[:200]})")
        return False
    fingerprint = _fingerprint(cflags)
    failed = folder / "failed.txt"
    if failed.exists() and failed.read_text(errors="replace").startswith(fingerprint):
        _warn(f"the C++ kernels failed to build before (the compiler's message: {failed}); delete that file "
              "to try again")
        return False
    with _build_lock(folder):
        stale = folder / "lock"
        if stale.exists():  # torch's own lock: its owner died, or it would hold ours too
            stale.unlink()
        started = time.monotonic()
        fresh = not any(folder.glob("*.so")) and not any(folder.glob("*.pyd"))
        if fresh:
            print("moekit: compiling its C++ kernels for this CPU (first use; a minute or two, longer on a "
                  "busy machine)", file=sys.stderr, flush=True)
        try:
            cpp_extension.load(name=name, sources=[str(s) for s in SOURCES], is_python_module=False,
                               build_directory=str(folder), extra_cflags=cflags, extra_ldflags=["-fopenmp"])
        except Exception as e:  # noqa: BLE001  (no compiler, no headers: the references still work)
            _atomic_write(failed, f"{fingerprint}\n{type(e).__name__}: {e}\n")
            _warn(f"the C++ kernels did not build ({type(e).__name__}: {str(e)[:200]}); using the torch "
                  f"references (the compiler's message: {failed})")
            return False
        if fresh:
            print(f"moekit: kernels built in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return True


def _fingerprint(cflags: list[str]) -> str:
    h = hashlib.sha256(" ".join([torch.__version__, *cflags]).encode())
    for s in SOURCES:
        h.update(s.read_bytes())
    return h.hexdigest()


def _warn(msg: str) -> None:
    warnings.warn(f"moekit: {msg}", stacklevel=4)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def _build_lock(folder: Path):
    """An exclusive OS file lock on folder/../<name>.moekit-lock for the build's duration.
    The OS drops it when the holder dies, so it can never be left stale."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder.with_name(folder.name + ".moekit-lock")
    with open(path, "a+b") as f:
        if _try_lock(f):
            yield
            return
        print("moekit: waiting for another process that is building the kernels", file=sys.stderr, flush=True)
        _lock(f)
        yield


def _try_lock(f) -> bool:
    try:
        import fcntl

        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False


def _lock(f) -> None:
    try:
        import fcntl

        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    except ImportError:  # Windows: LK_LOCK retries for 10 s at a time
        import msvcrt

        while True:
            try:
                msvcrt.locking(f.fileno(), msvcrt.LK_LOCK, 1)
                return
            except OSError:
                continue

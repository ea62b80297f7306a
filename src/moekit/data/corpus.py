"""Corpora as lists of documents (bytes), split into train/validation by file.

The embedded default is the source of the running Python's standard library: every
Python install has it, it is plain text, and it needs no download. Files are listed in
sorted order and capped by size, so the same Python gives the same corpus; the
fingerprint (sha256 over paths and contents) is saved in every run to prove it.

The split hashes each file's relative path (not its position), so adding a file never
moves another one across the train/validation boundary.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# Directories left out of the default corpus: third-party packages (they differ between
# installs) and test suites (huge, repetitive data tables).
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                        "__pycache__", "__phello__"})
DEFAULT_MAX_BYTES = 12_000_000


@dataclass(frozen=True)
class Corpus:
    """Documents of one corpus, already split. Paths are relative, in posix form."""

    name: str
    train_paths: tuple[str, ...]
    train_docs: tuple[bytes, ...]
    val_paths: tuple[str, ...]
    val_docs: tuple[bytes, ...]
    fingerprint: str

    @property
    def train_bytes(self) -> int:
        return sum(len(d) for d in self.train_docs)

    @property
    def val_bytes(self) -> int:
        return sum(len(d) for d in self.val_docs)

    def summary(self) -> dict:
        return {"name": self.name, "fingerprint": self.fingerprint,
                "train_files": len(self.train_paths), "val_files": len(self.val_paths),
                "train_bytes": self.train_bytes, "val_bytes": self.val_bytes}


def fingerprint(paths: list[str], docs: list[bytes]) -> str:
    """sha256 over (path, length, content) of every document, in order."""
    h = hashlib.sha256()
    for path, doc in zip(paths, docs, strict=True):
        h.update(path.encode() + b"\0" + str(len(doc)).encode() + b"\0")
        h.update(doc)
    return h.hexdigest()


def is_val_path(path: str, val_fraction: float) -> bool:
    """sha1 of the relative path, read as a number in [0, 1), below val_fraction."""
    head = hashlib.sha1(path.encode()).digest()[:4]
    return int.from_bytes(head, "big") / 2**32 < val_fraction


def stdlib_files(max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[Path, list[str]]:
    """Sorted *.py files of the stdlib (no site-packages, no tests), capped at max_bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rels = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py")
                  if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))
    chosen, total = [], 0
    for rel in rels:
        size = (root / rel).stat().st_size
        if size and total + size <= max_bytes:
            chosen.append(rel)
            total += size
    return root, chosen


def split_corpus(name: str, paths: list[str], docs: list[bytes], val_fraction: float) -> Corpus:
    """Hash split by path; a corpus that cannot be split by file (one file, or every file
    on one side) holds out the last val_fraction of its bytes instead."""
    is_val = [is_val_path(p, val_fraction) for p in paths]
    if all(is_val) or not any(is_val):
        return _tail_split(name, paths, docs, val_fraction)
    pick = lambda want: tuple(x for x, v in zip(paths, is_val, strict=True) if v == want)  # noqa: E731
    pick_docs = lambda want: tuple(d for d, v in zip(docs, is_val, strict=True) if v == want)  # noqa: E731
    return Corpus(name, pick(False), pick_docs(False), pick(True), pick_docs(True),
                  fingerprint(paths, docs))


def _tail_split(name: str, paths: list[str], docs: list[bytes], val_fraction: float) -> Corpus:
    blob = b"\n".join(docs)
    cut = max(1, min(len(blob) - 1, round(len(blob) * (1 - val_fraction))))
    label = paths[0] if len(paths) == 1 else f"{len(paths)} files"
    return Corpus(name, (f"{label}[:{cut}]",), (blob[:cut],), (f"{label}[{cut}:]",), (blob[cut:],),
                  fingerprint(paths, docs))


def stdlib_corpus(max_bytes: int = DEFAULT_MAX_BYTES, val_fraction: float = 0.05) -> Corpus:
    root, rels = stdlib_files(max_bytes)
    docs = [(root / rel).read_bytes() for rel in rels]
    return split_corpus(f"python{sysconfig.get_python_version()}-stdlib", rels, docs, val_fraction)


def path_corpus(path: str | Path, max_bytes: int | None = None, val_fraction: float = 0.05) -> Corpus:
    """A user text file, or every text file under a folder (sorted, hidden ones skipped)."""
    root = Path(path)
    if not root.exists():
        raise ValueError(f"data path {str(path)!r} does not exist; pass a text file or a folder of text files")
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts))
    paths, docs, total = [], [], 0
    for f in files:
        data = f.read_bytes()
        if not data or not _is_text(data) or (max_bytes and total + len(data) > max_bytes):
            continue
        paths.append(f.name if f == root else f.relative_to(root).as_posix())
        docs.append(data)
        total += len(data)
    if total < 2:
        raise ValueError(f"data path {str(path)!r} holds no text (empty file, empty folder, "
                         f"or only binary files); pass UTF-8 text")
    return split_corpus(root.name, paths, docs, val_fraction)


def _is_text(data: bytes) -> bool:
    """UTF-8 without NUL bytes in the first 8 KiB (the heuristic git uses for binaries)."""
    head = data[:8192]
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start > len(head) - 4  # a multi-byte character cut at the boundary
    return True

"""TrainConfig: every knob of a training run, validated when it is built.

One nested shape serves the TOML file, `--set a.b=c` and run.json:
top-level keys are TrainConfig fields, `[data]` is DataConfig, and `[model]` holds
overrides merged into the preset's LMConfig (e.g. `model.n_layers=2`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from typing import Any

from moekit.data.corpus import DEFAULT_MAX_BYTES
from moekit.validation import invalid, is_int, is_num

DTYPES = ("float32", "bfloat16")


_bad = invalid
_is_int, _is_num = is_int, is_num


@dataclass(frozen=True)
class DataConfig:
    path: str | None = None  # None: the embedded corpus (the Python stdlib source)
    tokenizer: str = "byte"  # byte | bpe
    vocab_size: int = 2048  # bpe only
    max_bytes: int = DEFAULT_MAX_BYTES
    val_fraction: float = 0.05

    def __post_init__(self) -> None:
        from moekit.data.tokenizer import TOKENIZERS

        if self.path is not None and not isinstance(self.path, str):
            raise _bad("data", "path", self.path, "must be a path string")
        if self.tokenizer not in TOKENIZERS:
            raise _bad("data", "tokenizer", self.tokenizer, f"valid: {', '.join(TOKENIZERS.names())}")
        if not _is_int(self.vocab_size) or not 259 <= self.vocab_size <= 1_000_000:
            raise _bad("data", "vocab_size", self.vocab_size, "must be an integer in [259, 1e6]")
        if not _is_int(self.max_bytes) or self.max_bytes <= 0:
            raise _bad("data", "max_bytes", self.max_bytes, "must be a positive integer")
        if not _is_num(self.val_fraction) or not 0 < self.val_fraction < 1:
            raise _bad("data", "val_fraction", self.val_fraction, "must be in (0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "tiny"
    model: dict[str, Any] = field(default_factory=dict)  # LMConfig overrides
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 1200  # the default run: ~5 min on 2 quiet CPU cores (README)
    batch_size: int = 16  # sequences per optimizer step (split over grad_accum micro-steps)
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup: int = 60
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 200
    eval_batches: int = 8
    log_every: int = 50
    save_every: int = 300
    keep_last: int = 2
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    seed: int = 0
    out_dir: str | None = None  # None: runs/<preset>-<time>
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "float32"  # float32 | bfloat16 (autocast)
    # CPU intra-op threads (0: torch's default, one per core). 1 by default: the tiny
    # model's ops are small, and on a busy 2-core machine a second thread makes every op
    # wait at a barrier (measured under load: ~14 s/step with 2 threads, ~0.7 s with 1).
    # Float sums depend on the thread split, so bit-identical resume needs the same value.
    threads: int = 1
    # how the kernels the run uses are chosen (moekit.settings.tune): "measure" (timed
    # once per machine and shape class, ops/tune.py) or "rules" (fixed, the same on
    # every machine: runs that must match bit for bit across machines)
    tune: str = "measure"
    sample_tokens: int = 200  # tokens generated at the end of `moekit train` (0: none)

    def __post_init__(self) -> None:
        if isinstance(self.data, dict):  # built from TOML / JSON
            object.__setattr__(self, "data", DataConfig(**_known(DataConfig, self.data, "data")))
        if not isinstance(self.model, dict):
            raise _bad("train", "model", self.model, "must be a table of LMConfig overrides")
        for check in (_check_ints, _check_floats, _check_strings):
            check(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        return cls(**_known(cls, d, "train"))

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        try:
            d = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ValueError(f"config file {str(path)!r} does not exist") from None
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {e}") from None
        return cls.from_dict(d)


def _known(cls, d: dict[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid: {sorted(names)}")
    return d


def _check_ints(c: TrainConfig) -> None:
    positive = ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "log_every",
                "eval_every", "save_every", "keep_last", "max_bad_steps")
    for name in positive:
        v = getattr(c, name)
        if not _is_int(v) or v <= 0:
            raise _bad("train", name, v, "must be a positive integer")
    for name in ("warmup", "seed", "sample_tokens", "threads"):
        v = getattr(c, name)
        if not _is_int(v) or v < 0:
            raise _bad("train", name, v, "must be an integer >= 0")
    if c.batch_size % c.grad_accum:
        raise _bad("train", "grad_accum", c.grad_accum,
                   f"must divide batch_size={c.batch_size} (micro-batches are equal)")


def _check_floats(c: TrainConfig) -> None:
    for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
        v = getattr(c, name)
        if not _is_num(v) or v < 0:
            raise _bad("train", name, v, "must be a finite number >= 0")
    if c.lr == 0:
        raise _bad("train", "lr", c.lr, "must be > 0")
    if c.min_lr > c.lr:
        raise _bad("train", "min_lr", c.min_lr, f"must be <= lr={c.lr}")


def _check_strings(c: TrainConfig) -> None:
    if not isinstance(c.preset, str) or not c.preset:
        raise _bad("train", "preset", c.preset, "must be a preset name")
    if c.dtype not in DTYPES:
        raise _bad("train", "dtype", c.dtype, f"valid: {', '.join(DTYPES)}")
    if c.tune not in ("measure", "rules"):
        raise _bad("train", "tune", c.tune, "valid: measure, rules")
    ok_device = c.device in ("auto", "cpu", "cuda", "mps") or (
        isinstance(c.device, str) and c.device.startswith("cuda:") and c.device[5:].isdigit())
    if not ok_device:
        raise _bad("train", "device", c.device, "valid: auto, cpu, cuda, cuda:N, mps")
    if c.out_dir is not None and not isinstance(c.out_dir, str):
        raise _bad("train", "out_dir", c.out_dir, "must be a path string")


def parse_value(text: str) -> Any:
    """A --set value read as a TOML value (3, 0.1, true, "x", [1, 2]); a bare word is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(base: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` assignments to a nested config dict (a copy). Unknown keys are caught
    when the config is rebuilt from the dict, except under `model.`, checked by LMConfig."""
    out = _deep_copy(base)
    for item in assignments:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set steps=100 or data.tokenizer=bpe")
        *parents, leaf = key.strip().split(".")
        node = out
        for p in parents:
            if not isinstance(node.get(p, {}), dict):
                raise ValueError(f"--set {item!r}: {p!r} is not a section")
            node = node.setdefault(p, {})
        node[leaf] = parse_value(text.strip())
    return out


def _deep_copy(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in d.items()}


def merge_dicts(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive merge: over's leaves win; nested tables are merged, not replaced."""
    out = _deep_copy(base)
    for k, v in over.items():
        out[k] = merge_dicts(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out

"""Checkpoints: safetensors for every tensor, JSON for everything else, written atomically.

    checkpoints/step_00000300/
        model.safetensors        weights (shared tensors stored once)
        train_state.safetensors  optimizer moments, torch and data-sampler RNG states
        train_state.json         step, optimizer hyper-parameters, python/numpy RNG, configs
        manifest.json            written last: file names and sizes

A checkpoint is written into a hidden temp folder beside the final one, each file is
fsynced, the manifest goes last, and one os.replace publishes the folder. A reader only
accepts a folder whose manifest exists and whose file sizes match it, so a writer killed
at any moment (even `kill -9`) leaves either the previous checkpoint or the new one, never
half of one. Nothing is unpickled: torch.load is never called.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

MANIFEST = "manifest.json"
FORMAT = 1
# Test hook only: sleep in the middle of one write, so a test can kill the writer while
# the temp folder is half written.
_PAUSE_ENV = "MOEKIT_TEST_CHECKPOINT_PAUSE"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))


def save_checkpoint(root: str | Path, step: int, model, tensors: dict[str, torch.Tensor],
                    meta: dict, keep_last: int) -> Path:
    """Write model + train state for `step` atomically, then keep only the last keep_last."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    remove_temp_dirs(root)
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "train_state.safetensors"))
    _test_pause(step)
    _write_json(tmp / "train_state.json", meta)
    files = sorted(p.name for p in tmp.iterdir())
    for name in files:
        _fsync(tmp / name)
    _write_json(tmp / MANIFEST, {"format": FORMAT, "step": step,
                                 "files": {n: (tmp / n).stat().st_size for n in files}})
    _fsync(tmp / MANIFEST)
    _fsync(tmp)
    final = step_dir(root, step)
    if final.exists():  # a stale copy of this step from a run that was resumed earlier
        discard(final)
    os.replace(tmp, final)
    _fsync(root)
    prune(root, keep_last)
    return final


def _test_pause(step: int) -> None:
    """MOEKIT_TEST_CHECKPOINT_PAUSE="STEP:SECONDS" sleeps mid-write at that step (tests only)."""
    value = os.environ.get(_PAUSE_ENV)
    if value:
        at, _, seconds = value.partition(":")
        if int(at) == step:
            time.sleep(float(seconds))


def is_valid(path: str | Path) -> bool:
    """The manifest exists, parses, and every file it lists has the recorded size."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        return manifest.get("format") == FORMAT and bool(files) and all(
            (path / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def list_checkpoints(root: str | Path) -> list[Path]:
    """Valid checkpoints, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    return [p for p in dirs if is_valid(p)]


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune(root: Path, keep_last: int) -> None:
    for old in list_checkpoints(root)[:-keep_last]:
        discard(old)


def discard(ckpt: Path) -> None:
    """Delete a checkpoint folder: renamed to a temp name first (atomic), so a kill during
    the deletion leaves a temp folder that the next save clears, never a step_ folder
    with some of its files gone."""
    doomed = ckpt.with_name(f".tmp-{ckpt.name}-old-{os.getpid()}")
    os.replace(ckpt, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def remove_temp_dirs(root: Path) -> None:
    """Temp folders left by a writer that was killed (they never hold a valid checkpoint)."""
    for p in Path(root).glob(".tmp-step_*"):
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: str | Path, model=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Load weights into model (strict) and return (train-state tensors, metadata)."""
    path = Path(path)
    if not is_valid(path):
        raise ValueError(f"{str(path)!r} is not a complete checkpoint (missing manifest or wrong sizes)")
    if model is not None:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
        if missing or unexpected:
            raise ValueError(f"checkpoint {str(path)!r} does not fit the model: "
                             f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    meta = json.loads((path / "train_state.json").read_text())
    return load_file(str(path / "train_state.safetensors")), meta


# --- optimizer and RNG state <-> (tensors, JSON) -------------------------------------------

def optimizer_to_flat(optimizer, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors keyed by parameter name; hyper-parameters and scalars as JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim/{names[idx]}/{key}"] = value
            else:
                scalars[f"{names[idx]}/{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              | {"params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(optimizer, names: list[str], tensors: dict, meta: dict) -> None:
    index = {n: i for i, n in enumerate(names)}
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            name, _, field = key[len("optim/"):].rpartition("/")
            state.setdefault(index[name], {})[field] = value
    for key, value in meta["scalars"].items():
        name, _, field = key.rpartition("/")
        state.setdefault(index[name], {})[field] = value
    groups = [g | {"params": [index[n] for n in g["params"]]}
              | ({"betas": tuple(g["betas"])} if "betas" in g else {}) for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_to_flat() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda{i}"] = s
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(mt), gauss],
                     "numpy": [kind, keys.tolist(), pos, has_gauss, cached]}


def rng_from_flat(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["rng/torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("rng/cuda")]
        if states:
            torch.cuda.set_rng_state_all(states)
    version, mt, gauss = meta["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))

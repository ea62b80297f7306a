"""moekit.from_pretrained(folder): a local HF checkpoint into moekit's own MoE model.

    config.json ─ families.lm_config_from_hf ─▶ HFLMConfig ─▶ HFMoELM on the meta device
    safetensors headers ─ weights.recipe per moekit tensor ─▶ every shape checked, no data read
    free memory ≥ the weights? ─▶ allocate each tensor once, in its dtype, on the device
    shard by shard: every piece copied from the file straight into its place

So the peak is the weights plus one shard's mapped pages (plus the RoPE tables), and a
config.json that does not fit its files, or a model that does not fit in memory, is
refused before anything is allocated.

Safetensors only: a `pytorch_model.bin` is a pickle, and unpickling a file runs code
from it, so it is refused, never opened. The index's shard names must stay inside the
folder. Every failure names the file or tensor.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import torch
from torch import nn

from moekit.models.accounting import load_config
from moekit.models.hf.families import lm_config_from_hf
from moekit.models.hf.model import HFMoELM
from moekit.models.hf.weights import Recipe, assemble, pieces, recipe

PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _shard_path(folder: Path, index: Path, name: str, shard) -> Path:
    """The file an index entry names; it must be a relative path that stays in the folder
    (checked on the text: a symlink inside the folder, as in the HF hub cache, is followed)."""
    if not isinstance(shard, str):
        raise ValueError(f"{index}: weight_map[{name!r}] is {shard!r}; expected the name of a "
                         "safetensors file in the checkpoint folder (a string)")
    first = os.path.normpath(shard).split(os.sep)[0]
    if os.path.isabs(shard) or os.path.splitdrive(shard)[0] or first in ("..", "."):
        raise ValueError(f"{index}: weight_map[{name!r}] = {shard!r} is not a file inside the "
                         "checkpoint folder; shard paths may not leave it")
    return folder / shard


def weight_files(folder: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file that holds it (checked to exist)."""
    index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files = {n: _shard_path(folder, index, n, f) for n, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise FileNotFoundError(f"{index} names shard {f.name!r}, which is missing from {folder}")
        return files
    if single.is_file():
        return dict.fromkeys(safetensors_header(single), single)
    pickles = [n for n in PICKLE_NAMES if (folder / n).exists()]
    if pickles:
        raise ValueError(f"{folder} holds {pickles[0]}, a pickle file: unpickling runs code from "
                         "the file, so moekit does not load it. Convert it to safetensors first.")
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt: {e})") from None


def safetensors_header(path: Path) -> dict[str, dict]:
    """Tensor name -> {"dtype", "shape", "data_offsets"}, read from the file's header
    alone (no mapping of the data, which may be larger than memory); the data offsets
    are checked against the file's size, so a truncated file is found here."""
    def bad(why: str) -> ValueError:
        return ValueError(f"{path}: not a readable safetensors file (truncated or corrupt: {why})")

    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < n <= min(size - 8, 100 * 2**20):  # safetensors caps headers at 100 MB
            raise bad(f"header length {n} in a file of {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    header.pop("__metadata__", None)
    for name, h in header.items():
        ok = isinstance(h, dict) and _ints(h.get("shape")) and _ints(h.get("data_offsets")) \
            and len(h["data_offsets"]) == 2 and h["data_offsets"][0] <= h["data_offsets"][1]
        if not ok:
            raise bad(f"entry {name!r} has no valid shape / data_offsets")
        if 8 + n + h["data_offsets"][1] > size:
            raise bad(f"tensor {name!r} ends at byte {8 + n + h['data_offsets'][1]}, past the "
                      f"end of the file ({size} bytes)")
    return header


def _ints(v) -> bool:
    return isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)


def read_headers(files: dict[str, Path]) -> dict[str, torch.Tensor]:
    """HF tensor name -> a meta tensor of its shape and dtype, from the headers alone."""
    out, headers = {}, {}
    for name, f in files.items():
        if f not in headers:
            headers[f] = safetensors_header(f)
        h = headers[f].get(name)
        if h is None:
            raise ValueError(f"the index puts tensor {name!r} in {f.name}, which does not hold it")
        dtype = SAFETENSORS_DTYPES.get(h.get("dtype"))
        if dtype is None:
            raise ValueError(f"{f}: tensor {name!r} has dtype {h.get('dtype')!r}; moekit reads "
                             f"{', '.join(SAFETENSORS_DTYPES)}")
        t = torch.empty(h["shape"], dtype=dtype, device="meta")
        start, end = h["data_offsets"]
        if end - start != t.numel() * t.element_size():
            raise ValueError(f"{f}: tensor {name!r} of shape {tuple(t.shape)} and dtype "
                             f"{h['dtype']} has {end - start} bytes of data (corrupt header)")
        out[name] = t
    return out


def _targets(model: HFMoELM) -> dict[str, tuple[torch.Tensor, bool]]:
    """moekit name -> (its meta tensor, is a parameter): the parameters (a tied head once,
    as embed.weight) and the persistent buffers."""
    saved = model.state_dict(keep_vars=True).keys()
    out = {n: (p, True) for n, p in model.named_parameters()}
    out.update({n: (b, False) for n, b in model.named_buffers() if n in saved})
    return out


def plan_load(model: HFMoELM, headers: dict[str, torch.Tensor]) -> dict[str, tuple[Recipe, bool]]:
    """moekit name -> (recipe, read the fused HF tensor); every shape checked on the
    headers, and a checkpoint tensor the model does not use is an error."""
    cfg, plan, used = model.cfg, {}, set()
    E = cfg.moe.num_experts if cfg.moe is not None else 0

    def meta(name: str) -> torch.Tensor:
        if name not in headers:
            raise ValueError(f"checkpoint has no tensor {name!r}")
        used.add(name)
        return headers[name]

    for name, (want, _) in _targets(model).items():
        r = recipe(name, cfg.family, E)
        use_fused = r.fused is not None and r.fused in headers and r.names[0] not in headers
        t = meta(r.fused) if use_fused else assemble(r, meta)
        if t.shape != want.shape:
            first = r.names[0] if isinstance(r.names[0], str) else r.names[0][0]
            src = r.fused if use_fused else first + (" (+ the other experts)" if r.kind.startswith("stack") else "")
            raise ValueError(f"tensor {src} has shape {tuple(t.shape)}; config.json implies "
                             f"{tuple(want.shape)} for {name}")
        plan[name] = (r, use_fused)
    _check_unused(set(headers) - used, cfg.n_layers)
    return plan


def _check_unused(unused: set[str], n_layers: int) -> None:
    """Tensors the model does not use are an error (a wrong family would otherwise load
    half a model), except DeepSeek's multi-token-prediction layers past n_layers."""
    def ignorable(n: str) -> bool:
        m = re.match(r"model\.layers\.(\d+)\.", n)
        return (m is not None and int(m.group(1)) >= n_layers) or n.endswith("rotary_emb.inv_freq")

    unused = sorted(n for n in unused if not ignorable(n))
    if unused:
        raise ValueError(f"checkpoint tensors not used by the model: {unused[:5]}"
                         f"{' ...' if len(unused) > 5 else ''} ({len(unused)} in all)")


def available_bytes(device: torch.device) -> int | None:
    """Memory free for new tensors on device: MemAvailable on Linux, the CUDA allocator's
    free memory; None where it cannot be known (then nothing is checked)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
            return kib * 1024
        except (OSError, StopIteration, ValueError):
            return None
    return None


def check_fits(need: int, free: int | None, device: torch.device, dtype: torch.dtype) -> None:
    if free is not None and need > free:
        raise ValueError(f"the model needs {need / 2**30:.2f} GiB for its weights in "
                         f"{str(dtype).removeprefix('torch.')} on {device}, and only "
                         f"{free / 2**30:.2f} GiB is free there; load it in a smaller dtype "
                         "or on a device with more memory")


def _allocate(model: HFMoELM, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """One empty tensor per target, set into the model in place of its meta tensor."""
    out = {}
    for name, (meta, is_param) in _targets(model).items():
        t = torch.empty(meta.shape, dtype=dtype if is_param else meta.dtype, device=device)
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, nn.Parameter(t) if is_param else t)
        out[name] = t
    if model.cfg.tie_embeddings:
        model.head.weight = model.embed.weight
    return out


@torch.no_grad()
def _fill(out: dict[str, torch.Tensor], plan: dict, files: dict[str, Path]) -> None:
    """Copy every piece from its file into place, one shard open at a time (its mapping
    goes when the handle and the views of it do)."""
    by_file: dict[Path, list] = {}
    for name, (r, use_fused) in plan.items():
        for hf_name, dest, view in pieces(r, out[name], use_fused):
            by_file.setdefault(files[hf_name], []).append((hf_name, dest, view))
    for f in sorted(by_file):
        handle = _open(f)
        for hf_name, dest, view in by_file[f]:
            try:
                src = handle.get_tensor(hf_name)
            except Exception as e:
                raise ValueError(f"{f}: cannot read tensor {hf_name!r} (truncated file? {e})") from None
            dest.copy_(view(src))
        del handle, src


def from_pretrained(path: str | Path, *, dtype: torch.dtype | None = None,
                    max_seq_len: int | None = None, device: str | torch.device = "cpu") -> HFMoELM:
    """Load a local HF folder (config.json + safetensors) into an HFMoELM on `device`.

    dtype: parameters' dtype (default: the checkpoint's). max_seq_len: the longest
    sequence (RoPE tables, generation limit); default min(max_position_embeddings, 32768).
    """
    folder, device = Path(path), torch.device(device)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder (expected an HF checkpoint folder)")
    cfg = lm_config_from_hf(load_config(folder), max_seq_len)
    files = weight_files(folder)
    headers = read_headers(files)
    with torch.device("meta"):
        model = HFMoELM(cfg)
    plan = plan_load(model, headers)
    dtype = dtype or headers[plan["embed.weight"][0].names[0]].dtype
    need = sum(t.numel() * (dtype if p else t.dtype).itemsize for t, p in _targets(model).values())
    check_fits(need, available_bytes(device), device, dtype)
    _fill(_allocate(model, dtype, device), plan, files)
    with torch.device(device):
        model.rope = model.rope_tables()  # buffers, not weights: built here, not on meta
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    assert not left, f"from_pretrained left {left[:3]} unloaded"
    return model.eval()

"""moekit.from_pretrained(folder): a local HF checkpoint into moekit's own MoE model.

    config.json ─ families.lm_config_from_hf ─▶ HFLMConfig ─▶ HFMoELM (moekit MoELayers)
    model.safetensors | model.safetensors.index.json + shards
        ─ weights.recipe per moekit tensor (stack experts, cat gate|up) ─▶ load_state_dict

Safetensors only: a `pytorch_model.bin` is a pickle, and unpickling a file runs code
from it, so it is refused, never opened. Every failure names the file or tensor.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from moekit.models.accounting import load_config
from moekit.models.hf.families import lm_config_from_hf
from moekit.models.hf.model import HFMoELM
from moekit.models.hf.weights import assemble, recipe

PICKLE_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")


def weight_files(folder: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file that holds it (checked to exist)."""
    index, single = folder / "model.safetensors.index.json", folder / "model.safetensors"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files = {n: folder / f for n, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise FileNotFoundError(f"{index} names shard {f.name!r}, which is missing from {folder}")
        return files
    if single.is_file():
        return {n: single for n in _open(single).keys()}
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


class _Reader:
    """Reads HF tensors lazily, one open handle per shard; remembers what was read."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files, self.handles, self.used = files, {}, set()

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def __call__(self, name: str) -> torch.Tensor:
        if name not in self.files:
            raise ValueError(f"checkpoint has no tensor {name!r}")
        f = self.files[name]
        if f not in self.handles:
            self.handles[f] = _open(f)
        self.used.add(name)
        try:
            return self.handles[f].get_tensor(name)
        except Exception as e:
            raise ValueError(f"{f}: cannot read tensor {name!r} (truncated file? {e})") from None


def _state_dict(model: HFMoELM, read: _Reader) -> dict[str, torch.Tensor]:
    cfg, sd = model.cfg, {}
    E = cfg.moe.num_experts if cfg.moe is not None else 0
    for name, want in model.state_dict().items():
        if name == "head.weight" and cfg.tie_embeddings:
            continue
        r = recipe(name, cfg.family, E)
        use_fused = r.fused is not None and r.fused in read and r.names[0] not in read
        t = read(r.fused) if use_fused else assemble(r, read)
        if t.shape != want.shape:
            first = r.names[0] if isinstance(r.names[0], str) else r.names[0][0]
            src = r.fused if use_fused else first + (" (+ the other experts)" if r.kind.startswith("stack") else "")
            raise ValueError(f"tensor {src} has shape {tuple(t.shape)}; config.json implies "
                             f"{tuple(want.shape)} for {name}")
        sd[name] = t
    return sd


def _check_unused(read: _Reader, n_layers: int) -> None:
    """Tensors the model does not use are an error (a wrong family would otherwise load
    half a model), except DeepSeek's multi-token-prediction layers past n_layers."""
    def ignorable(n: str) -> bool:
        m = re.match(r"model\.layers\.(\d+)\.", n)
        return (m is not None and int(m.group(1)) >= n_layers) or n.endswith("rotary_emb.inv_freq")

    unused = sorted(n for n in read.files if n not in read.used and not ignorable(n))
    if unused:
        raise ValueError(f"checkpoint tensors not used by the model: {unused[:5]}"
                         f"{' ...' if len(unused) > 5 else ''} ({len(unused)} in all)")


def from_pretrained(path: str | Path, *, dtype: torch.dtype | None = None,
                    max_seq_len: int | None = None) -> HFMoELM:
    """Load a local HF folder (config.json + safetensors) into an HFMoELM on CPU.

    dtype: parameters' dtype (default: the checkpoint's). max_seq_len: the longest
    sequence (RoPE tables, generation limit); default min(max_position_embeddings, 32768).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder (expected an HF checkpoint folder)")
    cfg = lm_config_from_hf(load_config(folder), max_seq_len)
    read = _Reader(weight_files(folder))
    model = HFMoELM(cfg)
    sd = _state_dict(model, read)
    _check_unused(read, cfg.n_layers)
    dtype = dtype or sd["embed.weight"].dtype
    if cfg.tie_embeddings:
        sd["head.weight"] = sd["embed.weight"]
    model.load_state_dict(sd)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(dtype)
    return model.eval()

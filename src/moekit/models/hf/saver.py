"""save_pretrained: an HFMoELM back to the HF layout transformers loads.

config.json is the checkpoint's own (kept in HFLMConfig.hf_config); tensors are split
back by the same recipes the loader uses (experts per expert, [gate; up] halves).
Every file is written to a temporary name in the target folder and moved into place
with os.replace, so a crash never leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from moekit.models.hf.weights import recipe, split


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def hf_tensors(model) -> dict[str, torch.Tensor]:
    cfg = model.cfg
    E = cfg.moe.num_experts if cfg.moe is not None else 0
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name == "head.weight" and cfg.tie_embeddings:
            continue
        for hf_name, part in split(recipe(name, cfg.family, E), t.detach()).items():
            out[hf_name] = part.clone()  # own storage: safetensors refuses shared tensors
    return out


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def save_pretrained(model, path: str | Path, max_shard_bytes: int = 4 * 2**30) -> None:
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    hf_cfg = dict(model.cfg.hf_config)
    tensors = hf_tensors(model)
    hf_cfg["dtype"] = str(model.embed.weight.dtype).removeprefix("torch.")
    shards = _shards(tensors, max_shard_bytes)
    meta = {"format": "pt"}
    if len(shards) == 1:
        _atomic_write(folder / "model.safetensors", lambda tmp: save_file(shards[0], tmp, meta))
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _atomic_write(folder / fname, lambda tmp, s=shard: save_file(s, tmp, meta))
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _atomic_write(folder / "model.safetensors.index.json",
                      lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))
    _atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(json.dumps(hf_cfg, indent=2)))

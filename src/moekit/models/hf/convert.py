"""Convert an HF checkpoint folder through moekit: validate, change dtype, re-shard.

Every tensor is read into moekit's model (so a checkpoint that converts is one that
loads) and written back in the HF layout; tokenizer and generation files are copied.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "keep": None}
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json", "tokenizer.model")


def convert_hf(src: str | Path, dst: str | Path, dtype: str = "keep",
               max_shard_bytes: int = 4 * 2**30) -> dict:
    """src folder -> dst folder; returns a short summary (tensors, parameters, dtype)."""
    from moekit.models.hf.loader import from_pretrained

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not allowed; valid: {', '.join(DTYPES)}")
    src, dst = Path(src), Path(dst)
    if dst.resolve() == src.resolve():
        raise ValueError("the destination must differ from the source folder")
    model = from_pretrained(src, dtype=DTYPES[dtype])
    model.save_pretrained(dst, max_shard_bytes=max_shard_bytes)
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    return {"family": model.cfg.family, "parameters": model.num_parameters(),
            "dtype": str(model.embed.weight.dtype).removeprefix("torch.")}

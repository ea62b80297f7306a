"""Text in, text out for an HF checkpoint folder (used by `moekit generate`).

The folder's `tokenizer.json` is read with the `tokenizers` library (no code from the
folder runs). Without one, the prompt must be space-separated token ids and the
continuation is printed as ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def is_hf_folder(path: str | Path) -> bool:
    """A folder whose config.json names a model_type (a `moekit train` run has run.json)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "model_type" in json.loads(cfg.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def _eos_id(folder: Path, hf_cfg: dict) -> int | None:
    eos = hf_cfg.get("eos_token_id")
    gen = folder / "generation_config.json"
    if eos is None and gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
    return eos[0] if isinstance(eos, list) and eos else eos if isinstance(eos, int) else None


def generate_hf_text(folder: str | Path, prompt: str, max_new_tokens: int = 200, *,
                     temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = None,
                     seed: int = 0) -> str:
    """The continuation of prompt (not including it); stops at the config's EOS."""
    from moekit.inference import generate
    from moekit.models.hf.loader import from_pretrained

    folder = Path(folder)
    try:
        model = from_pretrained(folder)
    except FileNotFoundError as e:  # the CLI reports ValueErrors as clean errors
        raise ValueError(str(e)) from None
    tok_path = folder / "tokenizer.json"
    if tok_path.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_path))
        ids = tok.encode(prompt).ids
    else:
        try:
            ids, tok = [int(t) for t in prompt.split()], None
        except ValueError:
            raise ValueError(f"{folder} has no tokenizer.json: pass --prompt as space-separated "
                             "token ids") from None
    if not ids:
        raise ValueError("--prompt is empty after tokenisation")
    room = model.cfg.max_seq_len - len(ids)
    if room <= 0:
        raise ValueError(f"--prompt is {len(ids)} tokens; max_seq_len is {model.cfg.max_seq_len}")
    g = torch.Generator().manual_seed(seed)
    out = generate(model, torch.tensor(ids), min(max_new_tokens, room), temperature=temperature,
                   top_k=top_k, top_p=top_p, generator=g, eos_id=_eos_id(folder, model.cfg.hf_config))
    new = out[len(ids):].tolist()
    return tok.decode(new) if tok is not None else "".join(f" {t}" for t in new)

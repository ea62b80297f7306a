"""Reload a trained run (configs, tokenizer, latest complete checkpoint) for generation."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moekit.data.tokenizer import TOKENIZERS
from moekit.models import LMConfig, MoELM
from moekit.training.checkpoint import latest_checkpoint, load_checkpoint
from moekit.training.loop import CHECKPOINTS
from moekit.training.run import RUN_FILE, resolve_device


def load_run(run_dir: str | Path, device: str = "auto"):
    """(model in eval mode, tokenizer, run.json dict, checkpoint path)."""
    run_dir = Path(run_dir)
    if not (run_dir / RUN_FILE).is_file():
        raise ValueError(f"--run {str(run_dir)!r} is not a run folder ({RUN_FILE} is missing)")
    meta = json.loads((run_dir / RUN_FILE).read_text())
    path = latest_checkpoint(run_dir / CHECKPOINTS)
    if path is None:
        raise ValueError(f"--run {str(run_dir)!r} has no complete checkpoint yet")
    tokenizer = TOKENIZERS.get(meta["tokenizer"]).load(run_dir)
    model = MoELM(LMConfig.from_dict(meta["model"]))
    load_checkpoint(path, model)
    return model.to(resolve_device(device)).eval(), tokenizer, meta, path


def generate_text(run_dir: str | Path, prompt: str, max_new_tokens: int = 200, *,
                  temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = None,
                  seed: int = 0, device: str = "auto", threads: int = 1) -> str:
    """The continuation of prompt (not including it), decoded; stops at EOS. threads: CPU
    intra-op threads (0: torch's default), 1 for the same reason as TrainConfig.threads."""
    from moekit.inference import generate

    if threads:
        torch.set_num_threads(threads)

    model, tok, _, _ = load_run(run_dir, device)
    prompt_S = tok.encode(prompt.encode()).long()
    if prompt_S.numel() == 0:
        prompt_S = torch.tensor([tok.eos_id])  # EOS precedes every document in training
    dev = model.embed.weight.device
    room = model.cfg.max_seq_len - prompt_S.numel()
    if room <= 0:
        raise ValueError(f"--prompt is {prompt_S.numel()} tokens; the model's max_seq_len is {model.cfg.max_seq_len}")
    g = torch.Generator(device=dev).manual_seed(seed)
    ids = generate(model, prompt_S.to(dev), min(max_new_tokens, room), temperature=temperature,
                   top_k=top_k, top_p=top_p, generator=g, eos_id=tok.eos_id)
    return tok.decode(ids[prompt_S.numel():].tolist())

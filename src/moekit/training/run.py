"""`moekit train` as a library call: a run folder, data, model, the loop, the summary.

    <out_dir>/run.json        configs (train, model), corpus fingerprint, unigram baseline
    <out_dir>/tokenizer.json  bpe only
    <out_dir>/metrics.jsonl   one record per step, one per eval
    <out_dir>/checkpoints/    step_XXXXXXXX folders (see training/checkpoint.py)
    <out_dir>/loss.png, expert_load.png, sample.txt
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from moekit import settings
from moekit.data import TokenData, build_token_data, load_corpus, unigram_bits_per_byte
from moekit.distributed.launch import NullReporter, init_ep_run
from moekit.models import LMConfig, MoELM, get_preset
from moekit.training.checkpoint import latest_checkpoint, remove_temp_dirs
from moekit.training.config import TrainConfig, merge_dicts
from moekit.training.heap import keep_freed_memory
from moekit.training.loop import CHECKPOINTS, fit, train_flops_per_token
from moekit.training.metrics import Reporter, truncate_metrics
from moekit.training.trainer import Trainer

RUN_FILE = "run.json"
SAMPLE_PROMPT = "def "


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    steps: int
    val_loss: float  # nats/token
    val_bpb: float
    unigram_bpb: float  # bits/byte of the validation bytes under their own byte unigram
    sample: str | None
    seconds: float


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_config(cfg: TrainConfig, vocab_size: int) -> LMConfig:
    """The preset, with cfg.model merged in; vocab from the tokenizer; a changed d_model is
    passed on to the MoE layers unless they set their own; `model.moe.*` overrides are
    ignored for a dense preset."""
    base = get_preset(cfg.preset, vocab_size).to_dict()
    over = dict(cfg.model)
    if base.get("moe") is None:  # a dense preset: MoE overrides (shared by `compare`) do not apply
        over.pop("moe", None)
    elif "d_model" in over:
        over["moe"] = {"d_model": over["d_model"]} | dict(over.get("moe") or {})
    lm = LMConfig.from_dict(merge_dicts(base, over) | {"vocab_size": vocab_size})
    if cfg.seq_len > lm.max_seq_len:
        raise ValueError(f"train.seq_len={cfg.seq_len} is invalid: must be <= model.max_seq_len="
                         f"{lm.max_seq_len} (raise it with --set model.max_seq_len=N)")
    return lm


def run_dir_for(cfg: TrainConfig, resume: bool) -> Path:
    if cfg.out_dir is None:
        if resume:
            raise ValueError("--resume needs --out DIR: the run folder to continue")
        return Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.out_dir)


def check_run_dir(run_dir: Path, resume: bool) -> None:
    has_run = (run_dir / RUN_FILE).exists()
    if resume and not has_run:
        raise ValueError(f"--resume: {str(run_dir)!r} holds no run ({RUN_FILE} is missing)")
    if not resume and has_run:
        raise ValueError(f"{str(run_dir)!r} already holds a run; pass --resume to continue it "
                         f"or choose another --out")


def prepare_data(cfg: TrainConfig, run_dir: Path, saved: dict | None) -> TokenData:
    """Corpus and tokenizer; on resume the corpus must be the one the run started with."""
    corpus = load_corpus(cfg.data.path, cfg.data.max_bytes, cfg.data.val_fraction)
    if saved is not None and saved["corpus"]["fingerprint"] != corpus.fingerprint:
        raise ValueError(f"--resume: the corpus changed since the run started (fingerprint "
                         f"{corpus.fingerprint[:12]} != saved {saved['corpus']['fingerprint'][:12]})")
    return build_token_data(corpus, cfg.data.tokenizer, cfg.data.vocab_size, run_dir,
                            reuse=saved is not None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: TrainConfig, *, resume: bool = False, console: Console | None = None,
          ep: int = 0) -> TrainResult:
    """Train (or resume) a run; returns its final numbers. ep > 0: expert parallel under
    torchrun (moekit.distributed.launch); only rank 0 writes."""
    t_start = time.perf_counter()
    ctx = init_ep_run(ep, cfg.device) if ep else None
    is_main = ctx is None or ctx.is_main
    console = console or Console(soft_wrap=True, quiet=not is_main)
    run_dir = run_dir_for(cfg, resume) if ctx is None else ctx.from_main(run_dir_for(cfg, resume))
    check_run_dir(run_dir, resume)
    if ctx is not None:  # every rank checks before rank 0 writes run.json
        ctx.barrier()
    saved = json.loads((run_dir / RUN_FILE).read_text()) if resume else None
    run_dir.mkdir(parents=True, exist_ok=True)
    data = prepare_data(cfg, run_dir, saved)
    lm_cfg = model_config(cfg, data.tokenizer.vocab_size)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    settings.set(tune=cfg.tune)  # the process is this run's: its kernel choices follow the config
    keep_freed_memory()  # see training/heap.py
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device) if ctx is None else ctx.device
    model = MoELM(lm_cfg).to(device)
    meta = saved or run_metadata(cfg.replace(out_dir=str(run_dir)), model, data)
    trainer = Trainer(cfg, model if ctx is None else ctx.wrap(model), data, device)
    if resume:
        restore_latest(trainer, run_dir, console, write=is_main)
    elif is_main:
        (run_dir / RUN_FILE).write_text(json.dumps(meta, indent=1))
    print_header(console, run_dir, trainer, meta)
    reporter = (Reporter(run_dir, cfg.steps, cfg.log_every, start_step=trainer.step) if is_main
                else NullReporter())
    try:
        last_eval = fit(trainer, run_dir, reporter, {"run": meta})
    finally:
        reporter.close()
    return finish(trainer, run_dir, last_eval, meta, console, time.perf_counter() - t_start, is_main)


def run_metadata(cfg: TrainConfig, model: MoELM, data: TokenData) -> dict:
    return {"train": cfg.to_dict(), "model": model.cfg.to_dict(), "tokenizer": data.tokenizer.name,
            "params": model.num_parameters(), "active_params": model.num_active_parameters(),
            "train_flops_per_token": train_flops_per_token(model, cfg.seq_len),
            "corpus": data.corpus.summary(),
            "tokens": {"train": data.train_N.numel(), "val": data.val_N.numel()},
            "unigram_bpb": unigram_bits_per_byte(data.corpus.val_docs)}


def restore_latest(trainer: Trainer, run_dir: Path, console: Console, write: bool = True) -> None:
    root = run_dir / CHECKPOINTS
    if root.exists() and write:
        remove_temp_dirs(root)
    path = latest_checkpoint(root)
    if path is not None:
        trainer.restore(path)
    if write:  # drop what the interrupted run logged after its last checkpoint
        truncate_metrics(run_dir, trainer.step)
    if path is None:
        console.print("[yellow]no complete checkpoint yet: starting this run from step 0")
        return
    console.print(f"resumed from {path} (step {trainer.step})")


def print_header(console: Console, run_dir: Path, trainer: Trainer, meta: dict) -> None:
    m, c, corpus = trainer.model, trainer.cfg, meta["corpus"]
    console.print(f"run {run_dir} | preset {c.preset} | {m.num_parameters():,} params, "
                  f"{m.num_active_parameters():,} active | device {trainer.device}")
    console.print(f"data {corpus['name']} ({corpus['train_files']} train / {corpus['val_files']} val files, "
                  f"{corpus['train_bytes']:,} / {corpus['val_bytes']:,} bytes, sha256 {corpus['fingerprint'][:12]}) "
                  f"| tokenizer {meta['tokenizer']} ({trainer.data.tokenizer.vocab_size})")
    console.print(f"{c.steps} steps x {c.batch_size} x {c.seq_len} tokens "
                  f"(grad_accum {c.grad_accum}), lr {c.lr:g} -> {c.min_lr:g}")


def finish(trainer: Trainer, run_dir: Path, last_eval: dict | None, meta: dict, console: Console,
           seconds: float, is_main: bool = True) -> TrainResult:
    """Plots, a sample, and the summary lines."""
    if last_eval is None:  # resumed a run that had already finished
        val_loss = trainer.evaluate()
        last_eval = {"val_loss": val_loss, "val_bpb": trainer.data.bits_per_byte(val_loss)}
    if is_main:
        write_plots(run_dir, console)
    sample = write_sample(trainer, run_dir if is_main else None)  # generation runs on every rank
    uni = meta["unigram_bpb"]
    console.print(f"[bold]validation loss {last_eval['val_loss']:.4f} nats/token = "
                  f"{last_eval['val_bpb']:.3f} bits/byte[/bold] vs unigram baseline "
                  f"{uni:.3f} bits/byte ({uni * math.log(2):.4f} nats/byte) of the validation bytes")
    files = [n for n in ("checkpoints", "metrics.jsonl", "run.json", "loss.png", "expert_load.png",
                         "sample.txt", "tokenizer.json") if (run_dir / n).exists()]
    console.print(f"run folder: {run_dir} ({', '.join(files)})")
    if sample is not None:
        console.print(f"sample (prompt {SAMPLE_PROMPT!r}):", highlight=False)
        console.print(SAMPLE_PROMPT + sample, markup=False, highlight=False)
    console.print(f"done in {seconds:.0f} s")
    return TrainResult(run_dir, trainer.step, last_eval["val_loss"], last_eval["val_bpb"], uni,
                       sample, seconds)


def write_plots(run_dir: Path, console: Console) -> None:
    try:
        from moekit.analysis.plots import plot_run

        paths = plot_run(run_dir)
    except ImportError:
        console.print("[yellow]plots skipped: matplotlib is not installed (pip install 'moekit[plot]')")
        return
    console.print("plots: " + ", ".join(str(p) for p in paths))


def write_sample(trainer: Trainer, run_dir: Path) -> str | None:
    from moekit.inference import generate

    n = min(trainer.cfg.sample_tokens, trainer.model.cfg.max_seq_len - 8)
    if n <= 0:
        return None
    tok = trainer.data.tokenizer
    prompt_S = tok.encode(SAMPLE_PROMPT.encode()).long().to(trainer.device)
    g = torch.Generator(device=trainer.device).manual_seed(trainer.cfg.seed)
    ids = generate(trainer.model, prompt_S, n, temperature=0.8, top_k=50, generator=g,
                   eos_id=tok.eos_id)
    text = tok.decode(ids[prompt_S.numel():].tolist())
    if run_dir is not None:
        (run_dir / "sample.txt").write_text(SAMPLE_PROMPT + text)
    return text

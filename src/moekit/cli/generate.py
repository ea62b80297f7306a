"""`moekit generate`: sample a continuation from a trained run folder."""

from __future__ import annotations

import typer

from moekit.cli.train import fail


def generate_command(
    run: str = typer.Option(..., "--run", help="run folder written by `moekit train`"),
    prompt: str = typer.Option(..., help="text to continue"),
    max_new_tokens: int = typer.Option(200, help="tokens to generate (at most max_seq_len - prompt)"),
    temperature: float = typer.Option(0.8, help="0 = greedy"),
    top_k: int = typer.Option(50, help="keep the k most likely tokens (0 = all)"),
    top_p: float = typer.Option(1.0, help="nucleus sampling mass (1 = off)"),
    seed: int = typer.Option(0, help="sampling seed"),
    device: str = typer.Option("auto", help="auto, cpu, cuda"),
    threads: int = typer.Option(1, help="CPU threads (0: one per core)"),
) -> None:
    """Continue --prompt with the latest complete checkpoint of --run (or an HF checkpoint
    folder: config.json + safetensors)."""
    from moekit.models.hf.text import generate_hf_text, is_hf_folder
    from moekit.training.load import generate_text

    try:
        if is_hf_folder(run):
            text = generate_hf_text(run, prompt, max_new_tokens, temperature=temperature,
                                    top_k=top_k or None, top_p=None if top_p >= 1 else top_p, seed=seed)
        else:
            text = generate_text(run, prompt, max_new_tokens, temperature=temperature,
                                 top_k=top_k or None, top_p=None if top_p >= 1 else top_p,
                                 seed=seed, device=device, threads=threads)
    except ValueError as e:
        fail(str(e))
    typer.echo(prompt + text)

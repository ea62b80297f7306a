"""`moekit plan --config CONFIG --devices N --ep E`: per-device memory and all-to-all bytes."""

from __future__ import annotations

import json

import typer


def plan_command(
    config: str = typer.Option(..., "--config", help="config.json, or a folder holding one"),
    devices: int = typer.Option(..., help="number of devices (GPUs)"),
    ep: int = typer.Option(..., help="expert-parallel size (must divide devices/pp and num_experts)"),
    tp: int = typer.Option(1, help="tensor-parallel size (non-expert layers)"),
    pp: int = typer.Option(1, help="pipeline-parallel stages"),
    batch: int = typer.Option(4 * 2**20, help="global batch in tokens per optimizer step"),
    seq: int = typer.Option(4096, help="sequence length"),
    micro_batch: int = typer.Option(1, help="sequences per micro-batch per data-parallel replica"),
    dtype: str = typer.Option("bf16", help="weights and activations: fp32, bf16, fp16, fp8"),
    grad_dtype: str = typer.Option("fp32", help="main gradients"),
    moment_dtype: str = typer.Option("fp32", help="optimizer moments (DeepSeek-V3: bf16)"),
    optimizer: str = typer.Option("adam", help="adam, adamw or sgd (momentum)"),
    zero: int = typer.Option(1, help="0: replicated optimizer state; 1: ZeRO-1 over DP replicas"),
    recompute: str = typer.Option("full", help="full (store layer inputs) or none"),
    a2a_dtype: str = typer.Option(None, help="all-to-all payload dtype (default: --dtype)"),
    gpus_per_node: int = typer.Option(8, help="devices per node (for the inter-node share)"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON"),
) -> None:
    """Per-device memory (weights, gradients, optimizer state, activations) and all-to-all
    bytes per step for a model config at cluster scale. Assumptions: docs/plan.md."""
    from moekit.distributed.plan import PlanInput, format_plan, plan
    from moekit.models.accounting import load_config

    try:
        inp = PlanInput(devices=devices, ep=ep, tp=tp, pp=pp, batch_tokens=batch, seq=seq,
                        micro_batch=micro_batch, dtype=dtype, grad_dtype=grad_dtype,
                        moment_dtype=moment_dtype, optimizer=optimizer, zero=zero,
                        recompute=recompute, a2a_dtype=a2a_dtype, gpus_per_node=gpus_per_node)
        result = plan(load_config(config), inp)
    except (ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(result.to_dict(), indent=2) if as_json else format_plan(result, config))

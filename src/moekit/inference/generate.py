"""Autoregressive sampling from an MoELM: greedy, temperature, top-k, top-p (nucleus).

Two paths with the same result: with the KV cache the prompt is run once (prefill) and
each step feeds only the new token; without it every step recomputes the whole
sequence (the obviously-correct reference the cache is tested against).
"""

from __future__ import annotations

import torch

from moekit.inference.prepare import prepare_for_inference
from moekit.models.lm import MoELM


def _check_args(max_new_tokens, temperature, top_k, top_p) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens={max_new_tokens!r} must be an integer >= 0")
    if not temperature >= 0:
        raise ValueError(f"generate: temperature={temperature!r} must be >= 0 (0 = greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"generate: top_k={top_k!r} must be None or an integer >= 1")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate: top_p={top_p!r} must be None or in (0, 1]")


def sample_next(logits_BV: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row (B,). temperature 0 is greedy (argmax, top_k/top_p ignored)."""
    if temperature == 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits_BV = _nucleus(logits_BV, top_p)
    probs_BV = torch.softmax(logits_BV, dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def _nucleus(logits_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (Holtzman et
    al. 2020, "The Curious Case of Neural Text Degeneration" §3.1); the top token always stays."""
    sorted_BV, order_BV = torch.sort(logits_BV, descending=True, dim=-1)
    probs_BV = torch.softmax(sorted_BV, dim=-1)
    drop_sorted_BV = (probs_BV.cumsum(-1) - probs_BV) >= top_p  # mass before this token
    drop_BV = drop_sorted_BV.scatter(-1, order_BV, drop_sorted_BV)
    return logits_BV.masked_fill(drop_BV, float("-inf"))


@torch.no_grad()
def generate(model: MoELM, prompt_ids: torch.Tensor, max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             use_cache: bool = True, generator: torch.Generator | None = None,
             eos_id: int | None = None) -> torch.Tensor:
    """Continue prompt_ids ((S,) or (B, S)) by up to max_new_tokens tokens.

    Returns prompt + continuation, with the prompt's dimensionality. With eos_id, a row
    that emitted eos keeps emitting eos, and generation stops early once every row has.
    The model runs in eval mode (restored afterwards).
    """
    _check_args(max_new_tokens, temperature, top_k, top_p)
    squeeze = prompt_ids.dim() == 1
    ids_BS = prompt_ids[None] if squeeze else prompt_ids
    if ids_BS.dim() != 2 or ids_BS.shape[1] == 0:
        raise ValueError(f"generate: prompt_ids of shape {tuple(prompt_ids.shape)}; expected (S,) or (B, S) with S >= 1")
    B, S = ids_BS.shape
    limit = model.cfg.max_seq_len
    if S + max_new_tokens > limit:
        raise ValueError(f"generate: prompt ({S}) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's max_seq_len={limit}")
    was_training = model.training
    model.eval()
    prepare_for_inference(model)  # once per model: a second call finds it done
    try:
        out_BS = _decode(model, ids_BS, max_new_tokens, use_cache, eos_id,
                         lambda logits_BV: sample_next(logits_BV, temperature, top_k, top_p, generator))
    finally:
        model.train(was_training)
    return out_BS[0] if squeeze else out_BS


def _decode(model, ids_BS, max_new_tokens, use_cache, eos_id, pick) -> torch.Tensor:
    B, S = ids_BS.shape
    cache = model.new_kv_cache(B, S + max_new_tokens) if use_cache else None
    done_B = torch.zeros(B, dtype=torch.bool, device=ids_BS.device)
    feed_BS = ids_BS
    for _ in range(max_new_tokens):
        logits_BV = model(feed_BS, kv_cache=cache).logits[:, -1]
        next_B = pick(logits_BV)
        if eos_id is not None:
            next_B = torch.where(done_B, torch.full_like(next_B, eos_id), next_B)
            done_B = done_B | (next_B == eos_id)
        ids_BS = torch.cat([ids_BS, next_B[:, None]], dim=1)
        if eos_id is not None and bool(done_B.all()):
            break
        feed_BS = next_B[:, None] if use_cache else ids_BS
    return ids_BS

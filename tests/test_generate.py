"""generate: the KV-cache path equals recomputing the whole sequence; sampling filters."""

from __future__ import annotations

import pytest
import torch

from moekit import MoEConfig
from moekit.inference import generate, sample_next
from moekit.models import LMConfig, MoELM


def model_for(kind: str, dtype=torch.float32, scale: float = 4.0) -> MoELM:
    cfg = LMConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                   max_seq_len=48, dense_d_ff=48)
    if kind == "moe":
        cfg = cfg.replace(moe=MoEConfig(d_model=32, num_experts=4, top_k=2, d_ff=24))
    elif kind == "sigmoid":  # DeepSeek-style routing with a shared expert, first layer dense
        cfg = cfg.replace(first_k_dense=1, moe=MoEConfig(
            d_model=32, num_experts=8, top_k=3, d_ff=16, router="topk_sigmoid", n_group=4,
            topk_group=2, num_shared_experts=1, routed_scaling_factor=2.5))
    torch.manual_seed(0)
    model = MoELM(cfg).to(dtype)
    # larger weights than init_std: logits spread out, so greedy ties are not an issue
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


@pytest.mark.parametrize("kind", ["dense", "moe", "sigmoid"])
def test_greedy_cache_equals_no_cache(kind):
    model = model_for(kind)
    prompt = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    a = generate(model, prompt, 16, temperature=0.0, use_cache=True)
    b = generate(model, prompt, 16, temperature=0.0, use_cache=False)
    assert a.shape == (2, 23) and torch.equal(a[:, :7], prompt)
    assert torch.equal(a, b)
    assert len(set(a[0, 7:].tolist())) > 1  # not a degenerate constant continuation


@pytest.mark.parametrize("kind", ["dense", "moe", "sigmoid"])
def test_cached_decode_logits_equal_full_forward(kind):
    """Step-by-step cached logits vs one full forward of the same sequence: <= 1e-5 (fp32,
    weights at their init scale: logits of order 1)."""
    model = model_for(kind, scale=1.0).eval()
    seq = torch.randint(0, 64, (2, 23), generator=torch.Generator().manual_seed(2))
    full = model(seq).logits
    assert full.abs().max() > 0.1
    cache = model.new_kv_cache(2, 23)
    steps = [model(seq[:, :7], kv_cache=cache).logits]
    steps += [model(seq[:, t : t + 1], kv_cache=cache).logits for t in range(7, 23)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False])
def test_sampling_reproducible_and_same_on_both_paths(use_cache):
    model = model_for("moe", torch.float64)
    prompt = torch.randint(0, 64, (3, 4), generator=torch.Generator().manual_seed(3))
    kw = dict(temperature=0.8, top_k=20, top_p=0.95)
    a = generate(model, prompt, 12, use_cache=use_cache, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(model, prompt, 12, use_cache=True, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(a, b)


def test_top_k_1_and_tiny_top_p_are_greedy():
    model = model_for("moe")
    prompt = torch.randint(0, 64, (5,), generator=torch.Generator().manual_seed(4))
    greedy = generate(model, prompt, 10, temperature=0)
    assert greedy.shape == (15,)  # a 1D prompt gives a 1D answer
    assert torch.equal(generate(model, prompt, 10, temperature=1.5, top_k=1), greedy)
    assert torch.equal(generate(model, prompt, 10, temperature=1.5, top_p=1e-6), greedy)


def test_top_k_filter_keeps_only_the_k_best():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0, 2.0]]).expand(4000, 6)
    got = sample_next(logits, temperature=5.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert set(got.tolist()) == {1, 3, 5}


@pytest.mark.parametrize("top_p,allowed", [(0.5, {0}), (0.7, {0, 1}), (0.81, {0, 1, 2}), (1.0, {0, 1, 2, 3})])
def test_top_p_by_hand(top_p, allowed):
    """probs 0.5, 0.3, 0.15, 0.05: the nucleus is the shortest prefix reaching top_p."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(4000, 4)
    got = sample_next(logits, top_p=top_p, generator=torch.Generator().manual_seed(0))
    assert set(got.tolist()) == allowed


def test_eos_stops_and_pads():
    model = model_for("moe")
    prompt = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(5))
    greedy = generate(model, prompt, 8, temperature=0)
    eos = int(greedy[0, 7])  # the third generated token
    first = (greedy[0, 5:] == eos).nonzero()[0].item()
    out = generate(model, prompt, 8, temperature=0, eos_id=eos)
    assert out.shape == (1, 5 + first + 1)  # stops right after eos
    assert torch.equal(out, greedy[:, : 5 + first + 1])
    two = torch.cat([prompt, torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(6))])
    out2 = generate(model, two, 8, temperature=0, eos_id=eos)
    row0 = out2[0, 5:]
    hit = (row0 == eos).nonzero()[0].item()
    assert (row0[hit:] == eos).all()  # a finished row keeps emitting eos


def test_restores_training_mode_and_bad_args():
    model = model_for("dense").train()
    prompt = torch.zeros(1, 3, dtype=torch.long)
    generate(model, prompt, 2)
    assert model.training
    assert torch.equal(generate(model, prompt, 0), prompt)
    for kw in (dict(max_new_tokens=-1), dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0),
               dict(top_p=1.5), dict(max_new_tokens=46)):
        args = {"max_new_tokens": 2, **kw}
        with pytest.raises(ValueError, match="generate:"):
            generate(model, prompt, args.pop("max_new_tokens"), **args)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 2)

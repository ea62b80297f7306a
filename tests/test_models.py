"""MoELM: shapes, causality, KV cache, GQA, layer layout, tied head, config errors,
presets and parameter accounting, one training step; attention against a by-hand oracle."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from moekit import MoEConfig, MoELayer
from moekit.models import PRESETS, LMConfig, MoELM, get_preset
from moekit.models.attention import ATTENTIONS
from moekit.models.lm import DenseLayer, lm_loss
from moekit.models.norm import NORMS
from moekit.models.presets import active_matched_d_ff
from moekit.models.rope import RotaryEmbedding


def small_cfg(moe: bool = True, **kw) -> LMConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                dense_d_ff=48)
    if moe:
        base["moe"] = MoEConfig(d_model=kw.get("d_model", 32), num_experts=4, top_k=2, d_ff=24,
                                aux_loss_coef=0.01)
    base.update(kw)
    return LMConfig(**base)


def build(cfg: LMConfig, seed: int = 0, dtype=torch.float32) -> MoELM:
    torch.manual_seed(seed)
    return MoELM(cfg).to(dtype).eval()


# ---------------------------------------------------------------- forward


def test_forward_shapes_loss_aux_stats():
    cfg = small_cfg(n_layers=3, first_k_dense=1)
    model = build(cfg).train()
    ids = torch.randint(0, 64, (3, 10))
    out = model(ids, targets_BS=ids)
    assert out.logits.shape == (3, 10, 64)
    assert out.loss.shape == () and math.isfinite(out.loss.item())
    assert out.aux_loss.shape == () and out.aux_loss.item() > 0  # aux_loss_coef > 0
    assert out.stats[0] is None and all(s is not None for s in out.stats[1:])
    assert out.stats[1].tokens_per_expert.sum().item() == 3 * 10 * 2  # T·K slots, dropless
    assert out.kv_cache is None
    assert model(ids).loss is None


def test_aux_loss_is_sum_over_moe_layers():
    model = build(small_cfg(n_layers=3))
    ids = torch.randint(0, 64, (2, 8))
    out = model(ids)
    # the aux losses the MoE layers return, captured with a hook on a second (identical) forward
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, kw_out: seen.append(kw_out.aux_loss))
             for m in model.moe_layers()]
    model(ids)
    for h in hooks:
        h.remove()
    assert len(seen) == 3
    torch.testing.assert_close(out.aux_loss, torch.stack(seen).sum())


def test_dense_model_aux_loss_zero():
    out = build(small_cfg(moe=False))(torch.randint(0, 64, (2, 5)))
    assert out.aux_loss.item() == 0.0 and out.stats == [None, None]


def test_loss_is_mean_ce_over_unmasked_targets():
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    targets[0, :3] = -100
    want = F.cross_entropy(logits.reshape(-1, 7), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(lm_loss(logits, targets), want)
    assert lm_loss(logits, torch.full((2, 5), -100)).item() == 0.0  # no NaN when all ignored


@pytest.mark.parametrize("moe", [False, True])
def test_causal_future_token_does_not_change_past(moe):
    model = build(small_cfg(moe=moe))
    ids = torch.randint(0, 64, (2, 12))
    ids2 = ids.clone()
    ids2[:, 7] = (ids[:, 7] + 1) % 64
    a, b = model(ids).logits, model(ids2).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-4  # and the change does propagate forward


# ---------------------------------------------------------------- KV cache


@pytest.mark.parametrize("moe", [False, True])
def test_kv_cache_chunked_equals_full_forward(moe):
    """Prefill 5, then a chunk of 4 (the bottom-right mask), then 3 single steps."""
    model = build(small_cfg(moe=moe))
    ids = torch.randint(0, 64, (2, 12))
    full = model(ids).logits
    cache = model.new_kv_cache(2, 16)
    pieces, start = [], 0
    for n in (5, 4, 1, 1, 1):
        out = model(ids[:, start : start + n], kv_cache=cache)
        assert out.kv_cache is cache
        pieces.append(out.logits)
        start += n
    assert cache.offset == 12
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=0, atol=1e-5)


def test_kv_cache_overflow_and_max_seq_len_errors():
    model = build(small_cfg(max_seq_len=16))
    cache = model.new_kv_cache(1, 8)
    model(torch.zeros(1, 6, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="max_len=8"):
        model(torch.zeros(1, 3, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="batch 2 does not match"):
        model(torch.zeros(2, 1, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match=r"expected \(B, S\)"):
        model(torch.zeros(5, dtype=torch.long))


# ---------------------------------------------------------------- attention


def reference_attention(attn, x_BSD, theta):
    """By hand: RoPE as a complex rotation of the pairs (i, i + d/2), k/v heads repeated
    per group, explicit causal softmax. fp64."""
    B, S, _ = x_BSD.shape
    H, G, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    w = attn.state_dict()  # q_proj.weight, k_proj.weight, v_proj.weight, o_proj.weight
    q = (x_BSD @ w["q_proj.weight"].t()).view(B, S, H, d)
    k = (x_BSD @ w["k_proj.weight"].t()).view(B, S, G, d)
    v = (x_BSD @ w["v_proj.weight"].t()).view(B, S, G, d)
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    rot = torch.polar(torch.ones(S, d // 2, dtype=torch.float64),
                      torch.arange(S, dtype=torch.float64)[:, None] * freq)  # (S, d/2)

    def rope(t):
        c = torch.complex(t[..., : d // 2], t[..., d // 2 :]) * rot[None, :, None, :]
        return torch.cat([c.real, c.imag], -1)

    q, k = rope(q), rope(k)
    k, v = k.repeat_interleave(H // G, dim=2), v.repeat_interleave(H // G, dim=2)
    scores = torch.einsum("bshd,bthd->bhst", q, k) / math.sqrt(d)
    future = torch.triu(torch.ones(S, S, dtype=torch.bool), 1)
    p = scores.masked_fill(future, float("-inf")).softmax(-1)
    y = torch.einsum("bhst,bthd->bshd", p, v).reshape(B, S, H * d)
    return y @ w["o_proj.weight"].t()


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_attention_matches_reference(n_kv_heads):
    cfg = small_cfg(moe=False, n_kv_heads=n_kv_heads, rope_theta=500.0)
    model = build(cfg, dtype=torch.float64)
    attn = model.layers[0].attn
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    got = attn(x, model.rope(0, 9))
    torch.testing.assert_close(got, reference_attention(attn, x, 500.0), rtol=1e-10, atol=1e-10)


def test_gqa_equals_mha_with_repeated_kv_weights():
    gqa = build(small_cfg(n_kv_heads=2))
    mha = MoELM(gqa.cfg.replace(n_kv_heads=4)).eval()
    sd = gqa.state_dict()
    for key in list(sd):
        if key.endswith(("k_proj.weight", "v_proj.weight")):  # (G·d, D) -> (H·d, D)
            sd[key] = sd[key].view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(sd)
    assert gqa.layers[0].attn.state_dict()["k_proj.weight"].shape == (16, 32)
    ids = torch.randint(0, 64, (2, 10))
    torch.testing.assert_close(gqa(ids).logits, mha(ids).logits, rtol=1e-5, atol=1e-5)


def test_rope_tables_offset():
    rope = RotaryEmbedding(8, 32, 10000.0)
    t = rope(5, 3)
    torch.testing.assert_close(t.cos_SH, rope(0, 8).cos_SH[5:8])
    assert rope.state_dict() == {}  # tables are not checkpointed


# ---------------------------------------------------------------- layout and head


@pytest.mark.parametrize("n_layers,first_k,every,want", [
    (4, 0, 1, [0, 1, 2, 3]),
    (6, 1, 2, [1, 3, 5]),
    (6, 2, 2, [3, 5]),
    (3, 1, 1, [1, 2]),
    (4, 0, 0, []),
    (4, 4, 1, []),
])
def test_moe_layer_layout(n_layers, first_k, every, want):
    cfg = small_cfg(n_layers=n_layers, first_k_dense=first_k, moe_every=every)
    model = build(cfg)
    assert cfg.moe_layer_ids == want
    got = [i for i, b in enumerate(model.layers) if isinstance(b.ffn, MoELayer)]
    assert got == want and len(model.moe_layers()) == len(want)
    dense = [b.ffn for i, b in enumerate(model.layers) if i not in want]
    assert all(isinstance(f, DenseLayer) and f.w_out.shape == (32, 48) for f in dense)
    stats = model(torch.randint(0, 64, (1, 4))).stats
    assert [i for i, s in enumerate(stats) if s is not None] == want


def test_tied_head_shares_storage():
    tied = build(small_cfg(tie_embeddings=True))
    untied = build(small_cfg(tie_embeddings=False))
    assert tied.head.weight is tied.embed.weight
    assert tied.head.weight.data_ptr() == tied.embed.weight.data_ptr()
    assert untied.head.weight.data_ptr() != untied.embed.weight.data_ptr()
    assert untied.num_parameters() - tied.num_parameters() == 64 * 32
    # a gradient step on the head moves the embedding too
    out = tied(torch.randint(0, 64, (1, 4)))
    out.logits.sum().backward()
    assert tied.embed.weight.grad is not None


def test_token_ids_and_mask_reach_moe_layers():
    model = build(small_cfg(n_layers=2))
    seen = []
    hooks = [m.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw), with_kwargs=True)
             for m in model.moe_layers()]
    ids = torch.randint(0, 64, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    out = model(ids, mask=mask)
    for h in hooks:
        h.remove()
    assert len(seen) == 2
    assert all(torch.equal(kw["token_ids"], ids) and torch.equal(kw["mask"], mask) for kw in seen)
    # padding is left out of the balance losses: the aux loss changes with the mask
    assert not torch.allclose(out.aux_loss, model(ids).aux_loss)


def test_dropout_only_in_training():
    model = build(small_cfg(dropout=0.5))
    ids = torch.randint(0, 64, (2, 6))
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)
    model.train()
    assert not torch.allclose(model(ids).logits, model(ids).logits)


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("kw,field", [
    (dict(vocab_size=0), "vocab_size"),
    (dict(d_model=-4), "d_model"),
    (dict(n_heads=3), "n_heads"),  # 32 % 3
    (dict(n_kv_heads=3), "n_kv_heads"),  # does not divide 4
    (dict(n_kv_heads=8), "n_kv_heads"),
    (dict(head_dim=7), "head_dim"),  # odd: RoPE needs pairs
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(norm_eps=-1e-5), "norm_eps"),
    (dict(dense_d_ff=0), "dense_d_ff"),
    (dict(first_k_dense=3), "first_k_dense"),  # > n_layers
    (dict(moe_every=-1), "moe_every"),
    (dict(d_model=64), "moe"),  # moe.d_model stays 32
    (dict(dropout=1.0), "dropout"),
    (dict(init_std=0.0), "init_std"),
    (dict(tie_embeddings=1), "tie_embeddings"),
    (dict(attention="flash9"), "attention"),
    (dict(norm="batchnorm"), "norm"),
    (dict(ffn_kind="tanh"), "ffn_kind"),
    (dict(moe={"d_model": 32}), "moe"),
])
def test_bad_config_errors_name_the_field(kw, field):
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                moe=MoEConfig(d_model=32, num_experts=4, top_k=2, d_ff=24))
    base.update(kw)
    with pytest.raises(ValueError, match=rf"LMConfig\.{field}=") as e:
        LMConfig(**base)
    if field in ("attention", "norm"):
        registry = ATTENTIONS if field == "attention" else NORMS
        assert all(name in str(e.value) for name in registry.names())  # lists the valid ones


def test_config_dict_roundtrip_and_unknown_keys():
    cfg = get_preset("deepseek-like", 300)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert isinstance(d["moe"], dict) and d["moe"]["router"] == "topk_sigmoid"
    assert LMConfig.from_dict(d) == cfg
    assert LMConfig.from_dict(LMConfig().to_dict()) == LMConfig()
    with pytest.raises(ValueError, match="unknown field.*'n_expert'"):
        LMConfig.from_dict({**d, "n_expert": 3})
    with pytest.raises(ValueError, match="MoEConfig: unknown"):
        LMConfig.from_dict({**d, "moe": {**d["moe"], "bogus": 1}})
    assert cfg.replace(n_layers=2).n_layers == 2 and cfg.n_layers == 4
    with pytest.raises(ValueError, match="first_k_dense"):
        cfg.replace(n_layers=0 + 1, first_k_dense=2)


def test_default_config_builds_and_head_size():
    cfg = LMConfig()
    assert cfg.head_size == cfg.d_model // cfg.n_heads and cfg.moe_layer_ids == []
    assert LMConfig(head_dim=16).head_size == 16
    MoELM(cfg)


# ---------------------------------------------------------------- presets and accounting


@pytest.mark.parametrize("name", PRESETS.names())
def test_presets_build_and_run(name):
    cfg = get_preset(name, 300)
    assert cfg.vocab_size == 300
    model = build(cfg).train()
    ids = torch.randint(0, 300, (1, 8))
    out = model(ids, targets_BS=ids)
    assert out.logits.shape == (1, 8, 300) and math.isfinite(out.loss.item())
    (out.loss + out.aux_loss).backward()
    n_moe = len(cfg.moe_layer_ids)
    assert sum(s is not None for s in out.stats) == n_moe
    assert (n_moe == 0) == name.endswith("dense")


def test_preset_shapes():
    ds = get_preset("deepseek-like", 260)
    assert ds.moe_layer_ids == [1, 2, 3] and ds.moe.router == "topk_sigmoid"
    assert ds.moe.num_shared_experts == 1 and ds.moe.num_experts > 4 * ds.moe.top_k
    mx = get_preset("mixtral-like", 260)
    assert mx.moe.num_experts == 8 and mx.moe.top_k == 2 and mx.n_kv_heads < mx.n_heads
    with pytest.raises(ValueError, match="unknown preset 'gpt5'.*tiny"):
        get_preset("gpt5", 260)


@pytest.mark.parametrize("moe,dense", [("tiny", "dense"), ("micro", "micro-dense")])
def test_dense_twins_match_active_parameters(moe, dense):
    """Each dense preset has its MoE preset's active parameters per token (within the
    rounding of active_matched_d_ff: under 0.2% here) and its shapes otherwise."""
    m, d = get_preset(moe, 260), get_preset(dense, 260)
    assert d.moe is None and (d.d_model, d.n_layers, d.n_heads) == (m.d_model, m.n_layers, m.n_heads)
    a, b = MoELM(m).num_active_parameters(), MoELM(d).num_active_parameters()
    assert abs(a - b) <= 0.002 * a, (a, b)


def test_active_parameters_by_hand():
    """tiny: per MoE layer the token skips E - K = 6 experts of 3·D·F = 3·128·128."""
    model = MoELM(get_preset("tiny", 260))
    skipped = 4 * 6 * 3 * 128 * 128
    assert model.num_parameters() - model.num_active_parameters() == skipped
    assert model.num_parameters(exclude_embeddings=True) == model.num_parameters() - 260 * 128
    dense = MoELM(get_preset("dense", 260))
    assert dense.num_active_parameters() == dense.num_parameters()


def test_dense_preset_matches_tiny_active_parameters():
    tiny, dense = MoELM(get_preset("tiny", 260)), MoELM(get_preset("dense", 260))
    a, b = tiny.num_active_parameters(), dense.num_active_parameters()
    assert abs(a - b) / a < 0.01, (a, b)
    a, b = (m.num_active_parameters(exclude_embeddings=True) for m in (tiny, dense))
    assert abs(a - b) / a < 0.01, (a, b)
    assert active_matched_d_ff(get_preset("tiny", 260).moe) == 2 * 128 + 3


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("moe", [False, True])
def test_one_optimizer_step_reduces_loss(moe):
    model = build(small_cfg(moe=moe)).train()
    ids = torch.randint(0, 64, (4, 16))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    out = model(inputs, targets_BS=targets)
    (out.loss + out.aux_loss).backward()
    router = model.moe_layers()[0].router.weight if moe else None
    assert router is None or router.grad.abs().sum() > 0  # the router learns through weights_TK
    opt.step()
    with torch.no_grad():
        after = model(inputs, targets_BS=targets).loss
    assert after < out.loss - 1e-3


def test_one_expert_top1_model_equals_dense_model():
    """E = 1, K = 1 (renormalised weight 1): every MoE layer is its one expert, so the
    model equals the dense model holding the same weights."""
    moe_cfg = small_cfg(moe=False).replace(
        moe=MoEConfig(d_model=32, num_experts=1, top_k=1, d_ff=48))
    moe_model, dense_model = build(moe_cfg, dtype=torch.float64), build(small_cfg(moe=False), dtype=torch.float64)
    sd = {k: v for k, v in moe_model.state_dict().items() if ".router." not in k}
    sd = {k.replace("experts.w_in", "w_in").replace("experts.w_out", "w_out"): v[0] if ".ffn." in k else v
          for k, v in sd.items()}
    dense_model.load_state_dict(sd)
    ids = torch.randint(0, 64, (2, 9))
    torch.testing.assert_close(moe_model(ids).logits, dense_model(ids).logits, rtol=1e-12, atol=1e-12)

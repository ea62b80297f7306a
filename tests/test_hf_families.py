"""HF checkpoints of each family load into moekit's own model and match transformers.

For each family (the MoE ones, and the dense ones upcycling starts from) a tiny random
model (2 layers, d=32) is built by transformers with every listed feature switched on,
saved with save_pretrained, and loaded with moekit.from_pretrained. Checked: logits
(<= 1e-4), 16 greedy tokens, the experts chosen per layer (MoE families), and the way
back (moekit save_pretrained -> transformers).
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

import moekit
from moekit.inference.generate import generate

transformers = pytest.importorskip("transformers")

V = 64
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=24, vocab_size=V, max_position_embeddings=64, eos_token_id=None,
            bos_token_id=None, pad_token_id=None)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16,
            beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)
FAMILIES = {
    # sliding window 4 (prompt + 16 tokens go past it)
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=4),
    # shared expert with a sigmoid gate, top-k weights not renormalised, q/k/v biases
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
                      shared_expert_intermediate_size=16, norm_topk_prob=False),
    # q/k RMSNorm per head, head_dim (16) != hidden/heads (8)
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8, head_dim=16,
                      norm_topk_prob=True),
    # q/k RMSNorm over the full projection width, clip_qkv
    "olmoe": dict(num_experts=4, num_experts_per_tok=2, clip_qkv=2.0),
    # MLA with q compression, YaRN, sigmoid router + correction bias, 4 groups pick 2,
    # routed scaling, a shared expert, first layer dense
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=8,
                        n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=12,
                        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                        n_group=4, topk_group=2, num_key_value_heads=4, routed_scaling_factor=2.5,
                        rope_parameters=YARN),
    # MLA without q compression, softmax router with group-limited greedy top-3 (k >
    # topk_group, so the group limit changes choices),
    # routed scaling, 2 shared experts, YaRN
    "deepseek_v2": dict(n_routed_experts=8, num_experts_per_tok=3, moe_intermediate_size=8,
                        n_shared_experts=2, first_k_dense_replace=1, q_lora_rank=None,
                        kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                        n_group=4, topk_group=2, topk_method="group_limited_greedy",
                        num_key_value_heads=4, routed_scaling_factor=16.0, rope_parameters=YARN),
    # attention sinks, sliding window 4 on alternate layers (prompt + 16 tokens go past
    # it), q/k/v/o biases, router bias, top-k-then-softmax, clamped SwiGLU with
    # interleaved gate/up and biases, YaRN
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention"], swiglu_limit=1.0,
                    rope_parameters=dict(YARN, truncate=False)),
    # 4 layers: MoE every 2nd (routed top-1 + shared expert, score applied before the
    # expert), dense layers of intermediate_size_mlp, NoPE every 4th layer with
    # temperature tuning (floor_scale 4 so it acts), L2 q/k norm, chunked attention (4),
    # llama3 RoPE scaling
    "llama4_text": dict(num_hidden_layers=4, num_local_experts=4, num_experts_per_tok=1,
                        head_dim=8, intermediate_size_mlp=40, interleave_moe_layer_step=2,
                        attention_chunk_size=4, floor_scale=4, attn_scale=0.5,
                        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                             low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_position_embeddings=16)),
}
# dense families: an MoELM whose FFNs are all dense
DENSE = {
    # q/k/v/o biases, head_dim (16) != hidden/heads (8), llama3 RoPE scaling
    "llama": dict(attention_bias=True, head_dim=16,
                  rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=16)),
    # sliding window 4 on every layer (prompt + 16 tokens go past it)
    "mistral": dict(sliding_window=4, head_dim=16),
    # q/k/v biases, tied embeddings, sliding window 4 from layer 1 on
    "qwen2": dict(tie_word_embeddings=True, use_sliding_window=True, sliding_window=4,
                  max_window_layers=1),
    # per-head q/k RMSNorm, head_dim 16, q/k/v/o biases
    "qwen3": dict(head_dim=16, attention_bias=True),
}
FAMILIES.update(DENSE)
MOE = sorted(set(FAMILIES) - set(DENSE))


def _randomize(model: torch.nn.Module) -> None:
    """Weights big enough that routing and attention are far from uniform; norms and
    biases away from their 1/0 init; DeepSeek's correction bias non-zero (so it must
    change the selection and nothing else)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            else:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5 if "norm" in name else
                        torch.randn(p.shape, generator=g) * 0.1)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(torch.randn(b.shape, generator=g) * 0.5)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    family = request.param
    cfg = AutoConfig.for_model(family, **{**TINY, **FAMILIES[family]})
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    _randomize(hf)
    folder = tmp_path_factory.mktemp(family)
    hf.save_pretrained(folder)
    return family, folder, hf, moekit.from_pretrained(folder)


def _ids(batch=2, seq=12):
    return torch.randint(0, V, (batch, seq), generator=torch.Generator().manual_seed(1))


def test_logits_match_transformers(pair):
    family, _, hf, mk = pair
    ids = _ids()
    with torch.no_grad():
        want, got = hf(ids).logits, mk(ids).logits
    assert want.abs().max() > 1.0  # not a degenerate model
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_greedy_tokens_match_transformers(pair):
    family, _, hf, mk = pair
    prompt = _ids(batch=1, seq=5)
    want = hf.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    got = generate(mk, prompt, 16, temperature=0.0)
    assert got.tolist() == want.tolist()


# mean |logit - fp32 logit| / mean |fp32 logit| at most: about twice the worst of the 8
# families here (bf16 0.028, fp16 0.0032); bf16 can flip a near-tied expert choice, so the
# max error is not bounded as tightly
HALF_TOL = {torch.bfloat16: 0.06, torch.float16: 0.008}


@pytest.mark.parametrize("dtype", sorted(HALF_TOL, key=str), ids=str)
def test_half_precision_close_to_fp32(pair, dtype):
    family, folder, _, mk = pair
    half = moekit.from_pretrained(folder, dtype=dtype)
    ids = _ids()
    with torch.no_grad():
        want, got = mk(ids).logits, half(ids).logits
    assert got.dtype == dtype and half.embed.weight.dtype == dtype
    err = (got.float() - want).abs().mean() / want.abs().mean()
    assert err <= HALF_TOL[dtype], f"{family} {dtype}: relative mean error {err:.4f}"
    out = generate(half, _ids(batch=1, seq=5), 4, temperature=0.0)  # the KV-cache path too
    assert out.shape == (1, 9)


def _hf_choice(out) -> torch.Tensor:
    """Expert ids chosen by an HF router: (logits, weights, ids), or Llama 4's
    (scores (T, E) with 0 where not chosen, logits)."""
    if len(out) == 3:
        return out[2].detach()
    scores_TE = out[0].detach()
    return scores_TE.gt(0).nonzero()[:, 1].view(scores_TE.shape[0], -1)


def _capture_hf(hf) -> list[torch.Tensor]:
    out, hooks = [], []
    for m in hf.modules():
        if type(m).__name__.lower().endswith("router"):
            hooks.append(m.register_forward_hook(lambda mod, i, o: out.append(_hf_choice(o))))
    return out, hooks


@pytest.mark.parametrize("pair", MOE, indirect=True)
def test_expert_choices_match_transformers(pair):
    family, _, hf, mk = pair
    ids = _ids()
    want, hooks = _capture_hf(hf)
    got = []
    hooks += [layer.router.register_forward_hook(lambda mod, i, o: got.append(o.expert_ids_TK))
              for layer in mk.moe_layers()]
    with torch.no_grad():
        hf(ids), mk(ids)
    for h in hooks:
        h.remove()
    assert len(got) == len(want) == len(mk.moe_layers()) > 0
    for w, g in zip(want, got, strict=True):
        assert torch.equal(w.sort(-1).values, g.sort(-1).values)


def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    family, _, hf, mk = pair
    mk.save_pretrained(tmp_path / "out")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, hf(ids).logits, atol=1e-5, rtol=0)
    assert not list(tmp_path.joinpath("out").glob("*.tmp"))  # atomic writes cleaned up


def test_inspect_counts_the_loaded_model(pair):
    from moekit.models.accounting import count_parameters, load_config

    family, folder, hf, mk = pair
    report = count_parameters(load_config(folder))
    assert report.total == mk.num_parameters() == sum(p.numel() for p in hf.parameters())


def test_sharded_save_reloads(pair, tmp_path):
    family, _, _, mk = pair
    mk.save_pretrained(tmp_path / "sh", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "sh" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = moekit.from_pretrained(tmp_path / "sh")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, mk(ids).logits)


@pytest.mark.parametrize("family", ["llama", "mixtral"])
def test_gelu_ffns_match_transformers(family, tmp_path):
    """hidden_act "gelu": the dense FFNs and the experts run as GeGLU (exact erf GELU)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(family, **{**TINY, **FAMILIES[family], "hidden_act": "gelu"})
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    _randomize(hf)
    hf.save_pretrained(tmp_path)
    mk = moekit.from_pretrained(tmp_path)
    assert all(layer.cfg.expert == "geglu" for layer in mk.moe_layers())
    with torch.no_grad():
        torch.testing.assert_close(mk(_ids()).logits, hf(_ids()).logits, atol=1e-4, rtol=0)


def test_transformers_sharded_checkpoint_loads(pair, tmp_path):
    family, _, hf, mk = pair
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    again = moekit.from_pretrained(tmp_path)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, mk(ids).logits)


def _read_all(folder):
    from moekit.models.hf.loader import _open, weight_files

    files = weight_files(folder)
    return {n: _open(f).get_tensor(n) for n, f in files.items()}


def test_pieces_equal_assemble(pair):
    """The loader copies each piece from its file into place (weights.pieces);
    weights.assemble, which builds the whole tensor, is the reference."""
    from moekit.models.hf.weights import assemble, recipe

    family, folder, _, mk = pair
    hf_sd = _read_all(folder)
    E = mk.cfg.moe.num_experts if mk.cfg.moe is not None else 0
    for name, t in mk.state_dict().items():
        if name == "head.weight" and mk.cfg.tie_embeddings:
            continue
        want = assemble(recipe(name, mk.cfg.family, E), hf_sd.__getitem__)
        assert torch.equal(t, want.to(t.dtype)), name


@pytest.mark.parametrize("pair", ["qwen3_moe"], indirect=True)  # one per-expert family
def test_fused_experts_layout_loads(pair, tmp_path):
    """A folder with fused experts (experts.gate_up_proj (E, 2F, D), experts.down_proj
    (E, D, F)) loads as the per-expert one does."""
    from safetensors.torch import save_file

    family, folder, _, mk = pair
    sd, fused = _read_all(folder), {}
    for name, t in sd.items():
        m = re.fullmatch(r"(.*\.experts)\.(\d+)\.(gate|up|down)_proj\.weight", name)
        if m is None:
            fused[name] = t
    for i in range(mk.cfg.n_layers):
        pre, E = f"model.layers.{i}.mlp.experts", mk.cfg.moe.num_experts
        fused[f"{pre}.gate_up_proj"] = torch.stack([torch.cat(
            [sd[f"{pre}.{e}.gate_proj.weight"], sd[f"{pre}.{e}.up_proj.weight"]]) for e in range(E)])
        fused[f"{pre}.down_proj"] = torch.stack([sd[f"{pre}.{e}.down_proj.weight"] for e in range(E)])
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    save_file(fused, tmp_path / "model.safetensors")
    again = moekit.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(again.state_dict().items(), mk.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


# ---- bad inputs: each names what is wrong ----

@pytest.fixture
def mixtral_dir(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    src = tmp_path_factory.mktemp("mixtral_src")
    cfg = AutoConfig.for_model("mixtral", **{**TINY, **FAMILIES["mixtral"]})
    AutoModelForCausalLM.from_config(cfg).save_pretrained(src, max_shard_size="20KB")
    return src


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_shard(mixtral_dir, tmp_path):
    d = _copy(mixtral_dir, tmp_path / "m")
    shard = sorted(d.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard '{shard.name}', which is missing"):
        moekit.from_pretrained(d)


def test_index_names_missing_file(mixtral_dir, tmp_path):
    d = _copy(mixtral_dir, tmp_path / "m")
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.norm.weight"] = "nope.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        moekit.from_pretrained(d)


def test_truncated_safetensors(mixtral_dir, tmp_path):
    d = _copy(mixtral_dir, tmp_path / "m")
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{shard.name}.*(truncated|corrupt)"):
        moekit.from_pretrained(d)


def test_unknown_model_type(mixtral_dir, tmp_path):
    d = _copy(mixtral_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert' is not supported; valid: .*mixtral"):
        moekit.from_pretrained(d)


def test_wrong_tensor_shape(mixtral_dir, tmp_path):
    d = _copy(mixtral_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 20}))
    with pytest.raises(ValueError, match=r"shape \(4, 48, 32\).*\(4, 40, 32\)"):
        moekit.from_pretrained(d)


def test_config_field_out_of_range(mixtral_dir, tmp_path):
    d = _copy(mixtral_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "num_experts_per_tok": 9}))
    with pytest.raises(ValueError, match="top_k=9.*num_experts"):
        moekit.from_pretrained(d)


def test_quantized_checkpoint_refused(mixtral_dir, tmp_path):
    d = _copy(mixtral_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "fp8"}}))
    with pytest.raises(ValueError, match="quantization_config.*dequantize"):
        moekit.from_pretrained(d)


def test_pickle_checkpoint_refused(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "mixtral", **TINY,
                                               **FAMILIES["mixtral"]}))
    (d / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(ValueError, match="pickle.*does not load it"):
        moekit.from_pretrained(d)


# ---- CLI: convert and generate on an HF folder ----

def test_convert_cli_to_bf16_loads_in_transformers(mixtral_dir, tmp_path):
    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from moekit.cli.main import app

    out = CliRunner().invoke(app, ["convert", str(mixtral_dir), str(tmp_path / "bf16"), "--dtype", "bf16"])
    assert out.exit_code == 0, out.output
    src, dst = moekit.from_pretrained(mixtral_dir), moekit.from_pretrained(tmp_path / "bf16")
    for (name, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
        assert b.dtype == torch.bfloat16 and torch.equal(a.to(torch.bfloat16), b), name
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16
    bad = CliRunner().invoke(app, ["convert", str(tmp_path / "none"), str(tmp_path / "x")])
    assert bad.exit_code == 2 and "not a folder" in bad.output


def test_generate_cli_on_hf_folder(mixtral_dir):
    from typer.testing import CliRunner

    from moekit.cli.main import app

    out = CliRunner().invoke(app, ["generate", "--run", str(mixtral_dir), "--prompt", "5 6 7",
                                   "--max-new-tokens", "6", "--temperature", "0"])
    assert out.exit_code == 0, out.output
    want = generate(moekit.from_pretrained(mixtral_dir), torch.tensor([5, 6, 7]), 6, temperature=0.0)
    assert out.output.split() == [str(t) for t in want.tolist()]

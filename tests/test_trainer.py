"""Trainer: one step, loss falls, gradient accumulation equals one big batch, non-finite
steps, schedule and config validation."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from moekit.data import ByteTokenizer, TokenData
from moekit.data.corpus import split_corpus
from moekit.models import MoELM, get_preset
from moekit.training import (
    DataConfig,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    apply_overrides,
    train,
)
from moekit.training.schedule import lr_at
from moekit.training.step import accumulate, build_optimizer, train_step

TINY_MODEL = {"n_layers": 2, "d_model": 32, "n_heads": 2, "n_kv_heads": 2, "dense_d_ff": 64,
              "max_seq_len": 32, "moe": {"num_experts": 4, "top_k": 2, "d_ff": 32}}
CPU = torch.device("cpu")


def byte_data(text: bytes) -> TokenData:
    c = split_corpus("t", ["a.txt"], [text], 0.2)
    tok = ByteTokenizer()
    return TokenData(tok, c, tok.encode(c.train_docs[0]), tok.encode(c.val_docs[0]))


def tiny_lm(**moe):
    from moekit.training.run import model_config

    cfg = TrainConfig(model=TINY_MODEL | {"moe": TINY_MODEL["moe"] | moe}, seq_len=16)
    return MoELM(model_config(cfg, 259))


def test_one_training_step_updates_the_model():
    torch.manual_seed(0)
    cfg = TrainConfig(model=TINY_MODEL, seq_len=16, batch_size=4, steps=5, warmup=1)
    model = tiny_lm()
    trainer = Trainer(cfg, model, byte_data(b"hello world, " * 200), CPU)
    before = [p.detach().clone() for p in model.parameters()]
    result = trainer.train_step()
    assert trainer.step == 1 and not result.skipped
    assert abs(result.loss - math.log(259)) < 0.5  # near uniform at init
    assert result.loads_LE.shape == (2, 4) and int(result.loads_LE.sum()) == 2 * 4 * 16 * 2
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert math.isfinite(trainer.evaluate())


def test_loss_falls_on_a_small_synthetic_task(tmp_path):
    text = tmp_path / "fox.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 300)
    cfg = TrainConfig(model=TINY_MODEL, seq_len=16, batch_size=8, steps=30, lr=1e-2, min_lr=1e-3,
                      warmup=3, eval_every=30, save_every=30, log_every=30, sample_tokens=0,
                      data=DataConfig(path=str(text)), out_dir=str(tmp_path / "run"))
    result = train(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"train"' in line]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5, losses
    assert result.val_loss < math.log(259) - 1.5


def _batch(B: int = 8, S: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 259, (B, S + 1), generator=g)
    return x[:, :-1], x[:, 1:]


def test_accumulation_equals_one_big_batch():
    """k=4 micro-batches of 2 == one batch of 8: loss, aux loss (z-loss and the
    sequence-wise loss are token/sequence means), grads, loads and the DeepSeek-V3 bias step."""
    torch.manual_seed(0)
    # Switch f·P (aux_loss_coef) is a batch-level product, computed per micro-batch as in
    # Megatron-LM, so it is switched off here; z-loss and the sequence-wise loss are means.
    big = tiny_lm(router="topk_sigmoid", aux_loss_coef=0.0, z_loss_coef=1e-2, seq_aux_loss_coef=1e-2,
                  bias_update_rate=0.05).double()
    small = copy.deepcopy(big)
    x, y = _batch()
    loss1, aux1, loads1 = accumulate(big, [(x, y)], CPU)
    loss4, aux4, loads4 = accumulate(small, list(zip(x.chunk(4), y.chunk(4), strict=True)), CPU)
    # fp64 model; the LM's cross entropy runs in fp32 (models/lm.py), hence rtol ~1e-6
    assert loss4 == pytest.approx(loss1, rel=1e-6) and aux4 == pytest.approx(aux1, rel=1e-9)
    assert aux1 > 0 and torch.equal(loads1, loads4)
    for (name, p1), p4 in zip(big.named_parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(p4.grad, p1.grad, rtol=1e-5, atol=1e-9, msg=name)


def test_bias_moves_once_per_step_from_the_whole_batch_load():
    torch.manual_seed(1)
    big = tiny_lm(router="topk_sigmoid", aux_loss_coef=0.0, z_loss_coef=1e-2,
                  bias_update_rate=0.05).double()
    small = copy.deepcopy(big)
    x, y = _batch(seed=1)
    kw = {"lr": 1e-3, "grad_clip": 1.0, "device": CPU}
    r1 = train_step(big, build_optimizer(big, lr=1e-3, weight_decay=0.1), [(x, y)], **kw)
    r4 = train_step(small, build_optimizer(small, lr=1e-3, weight_decay=0.1),
                    list(zip(x.chunk(4), y.chunk(4), strict=True)), **kw)
    for layer1, layer4, load_E in zip(big.moe_layers(), small.moe_layers(), r1.loads_LE, strict=True):
        expect_E = 0.05 * torch.sign(load_E.float().mean() - load_E.float())  # one step, eq. 16
        assert torch.equal(layer1.router.expert_bias, expect_E)
        assert torch.equal(layer4.router.expert_bias, layer1.router.expert_bias)
        assert layer1.router.expert_bias.abs().sum() > 0
    for p1, p4 in zip(big.parameters(), small.parameters(), strict=True):
        torch.testing.assert_close(p4, p1, rtol=1e-6, atol=1e-9)
    assert r4.loss == pytest.approx(r1.loss, rel=1e-6)


def test_non_finite_steps_are_skipped_then_stop_the_run(capsys):
    torch.manual_seed(0)
    cfg = TrainConfig(model=TINY_MODEL, seq_len=16, batch_size=4, steps=10, max_bad_steps=3)
    model = tiny_lm()
    trainer = Trainer(cfg, model, byte_data(b"abcdefgh" * 300), CPU)
    with torch.no_grad():
        model.embed.weight[:, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        assert trainer.train_step().skipped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)
               if not a.isnan().any())
    assert trainer.optimizer.state == {} or all(
        int(s["step"]) == 0 for s in trainer.optimizer.state.values())
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps .* non-finite"):
        trainer.train_step()


def test_a_finite_step_resets_the_bad_streak():
    torch.manual_seed(0)
    cfg = TrainConfig(model=TINY_MODEL, seq_len=16, batch_size=4, steps=10, max_bad_steps=2)
    model = tiny_lm()
    trainer = Trainer(cfg, model, byte_data(b"abcdefgh" * 300), CPU)
    w = model.embed.weight.detach().clone()
    with torch.no_grad():
        model.embed.weight[:, 0] = float("inf")
    assert trainer.train_step().skipped and trainer.bad_streak == 1
    with torch.no_grad():
        model.embed.weight.copy_(w)
    assert not trainer.train_step().skipped and trainer.bad_streak == 0


def test_schedule_warmup_then_cosine():
    kw = {"lr": 1.0, "min_lr": 0.1, "warmup": 10, "steps": 110}
    assert lr_at(0, **kw) == pytest.approx(0.1) and lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.55)
    assert lr_at(110, **kw) == pytest.approx(0.1) and lr_at(500, **kw) == pytest.approx(0.1)


@pytest.mark.parametrize("sets,match", [
    (["steps=0"], r"train.steps=0 is invalid"),
    (["lr=-1"], r"train.lr=-1 is invalid"),
    (["grad_accum=3"], r"train.grad_accum=3 .* must divide batch_size=16"),
    (["min_lr=1.0"], r"train.min_lr=1.0 .* <= lr"),
    (["dtype=float8"], r"train.dtype='float8' .* float32, bfloat16"),
    (["device=tpu"], r"train.device='tpu'"),
    (["data.tokenizer=wordpiece"], r"data.tokenizer='wordpiece' .* valid: bpe, byte"),
    (["stepz=3"], r"unknown key\(s\) \['stepz'\]"),
    (["data.foo=1"], r"data: unknown key\(s\) \['foo'\]"),
    (["steps"], r"expected KEY=VALUE"),
])
def test_bad_configs_name_the_field(sets, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_dict(apply_overrides(TrainConfig().to_dict(), sets))


def test_set_values_are_typed():
    d = apply_overrides(TrainConfig().to_dict(), ["steps=7", "lr=1e-3", "data.tokenizer=bpe",
                                                  "model.moe.top_k=1", 'out_dir="x y"'])
    cfg = TrainConfig.from_dict(d)
    assert cfg.steps == 7 and cfg.lr == 1e-3 and cfg.data.tokenizer == "bpe" and cfg.out_dir == "x y"
    assert cfg.model == {"moe": {"top_k": 1}}


def test_bad_model_override_and_seq_len_are_rejected():
    from moekit.training.run import model_config

    with pytest.raises(ValueError, match="MoEConfig.top_k=9"):
        model_config(TrainConfig(model={"moe": {"top_k": 9}}), 259)
    with pytest.raises(ValueError, match="seq_len=512 .*max_seq_len=256"):
        model_config(TrainConfig(seq_len=512), 259)
    dense = model_config(TrainConfig(preset="dense", model={"moe": {"top_k": 1}}), 259)
    assert dense.moe is None and get_preset("dense", 259).dense_d_ff == dense.dense_d_ff

"""Expert parallelism on gloo: EP=2/4 against EP=1 with the same weights and data.

Each test launches this file as `python tests/test_distributed.py SCENARIO RANK WORLD DIR`
in WORLD subprocesses (a timeout on each, and a 30 s timeout on the process group, so
a hang fails fast). Workers compare against an unsharded reference built from the same
seed, assert inside, and write their measured max differences to DIR as JSON, which
the test reads back and checks again.

EP=1 reference semantics: rank p's loss is the mean over its own tokens (plus its aux
loss); the objective is the mean over ranks. The reference runs the unsharded layer on
every rank's shard in turn and averages, which is exactly what EP=1 data parallel does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

TOL = 1e-5
PG_TIMEOUT_S = 30


# ----------------------------------------------------------------- launcher (pytest side)
def launch(tmp: Path, scenario: str, world: int, timeout: float = 120.0) -> list[tuple[int, str]]:
    """Run `world` worker processes; return (returncode, stderr tail) per rank. Output goes
    to files, not pipes, so a chatty rank can never block on a full pipe."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    (tmp / f"store-{scenario}").unlink(missing_ok=True)
    logs = [tmp / f"{scenario}-{r}.log" for r in range(world)]
    procs = []
    for r in range(world):
        with open(logs[r], "w") as log:
            procs.append(subprocess.Popen([sys.executable, __file__, scenario, str(r), str(world), str(tmp)],
                                          stdout=log, stderr=subprocess.STDOUT, env=env))
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pytest.fail(f"scenario {scenario!r} hung for more than {timeout}s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, log.read_text()[-3000:]) for p, log in zip(procs, logs, strict=True)]


def run_ok(tmp: Path, scenario: str, world: int) -> list[dict]:
    results = launch(tmp, scenario, world)
    for rank, (rc, err) in enumerate(results):
        assert rc == 0, f"{scenario} rank {rank} exited {rc}:\n{err}"
    return [json.loads((tmp / f"{scenario}-{r}.json").read_text()) for r in range(world)]


# ----------------------------------------------------------------- tests
def test_layer_parity_ep4_ep2x2_capacity_empty_and_uneven(tmp_path):
    out = run_ok(tmp_path, "layer", 4)
    for rank, res in enumerate(out):
        for case, diffs in res["cases"].items():
            for what, d in diffs.items():
                assert d <= TOL, f"rank {rank} {case} {what}: max diff {d}"
    cases = out[0]["cases"]
    assert {"ep4", "ep2x2", "capacity_ep4", "empty_rank", "uneven"} <= set(cases)
    # the empty / uneven cases really were empty / uneven
    assert out[3]["recv_rows"]["empty_rank"] == 0 and out[0]["recv_rows"]["empty_rank"] > 0
    uneven = [r["recv_rows"]["uneven"] for r in out]
    assert max(uneven) >= 8 * max(1, min(uneven)), uneven
    assert out[0]["dropped"]["capacity_ep4"] > 0
    assert all(r["divisibility_error"] for r in out)


def test_lm_training_ep2_matches_ep1_and_resumes_at_ep1_and_ep4(tmp_path):
    out = run_ok(tmp_path, "lm", 4)
    r0 = out[0]
    assert len(r0["losses"]) == len(r0["ref_losses"]) == STEPS
    diffs = [abs(a - b) for a, b in zip(r0["losses"], r0["ref_losses"], strict=True)]
    assert max(diffs) <= 1e-4, diffs
    assert r0["losses"][-1] < 0.5 * r0["losses"][0]  # it trains
    assert r0["clipped_steps"] > 0  # the global grad norm was exercised
    wrapped, plain = r0["counts"]
    assert wrapped == plain  # parameter counts under EP see all experts
    # the aux-loss-free bias moved, identically on every rank and as at EP=1
    assert any(abs(b) > 0 for b in r0["bias"])
    assert all(r["bias"] == r0["bias"] for r in out)
    assert r0["bias"] == pytest.approx(r0["ref_bias"], abs=1e-7)
    # saved at EP=2 (weights + AdamW moments), resumed at EP=4 and EP=1: the next steps'
    # losses equal those of the EP=2 run that kept going
    for r in out:
        assert r["after_ep4"] == pytest.approx(r0["after"], abs=1e-5)
    assert r0["after_ep1"] == pytest.approx(r0["after"], abs=1e-5)
    assert r0["expert_keys_in_file"] == r0["expert_keys_in_model"] > 0 and r0["full_moments"]
    # the trainer itself (`moekit train --ep 2` on 4 ranks) against its single-process run
    assert len(r0["trainer_losses"]) == len(r0["trainer_ref_losses"]) == 4
    assert r0["trainer_losses"] == pytest.approx(r0["trainer_ref_losses"], abs=1e-5)


def test_dead_rank_fails_others_fast(tmp_path):
    t0 = time.monotonic()
    results = launch(tmp_path, "die", 2, timeout=90)
    elapsed = time.monotonic() - t0
    (rc0, err0), (rc1, _) = results
    assert rc1 == 3  # the rank that died
    assert rc0 != 0, "the surviving rank did not fail"
    assert "expert_parallel:" in err0 and "peer rank may have died" in err0, err0
    assert elapsed < 60


# ----------------------------------------------------------------- `moekit plan` (in process)
TINY_MIXTRAL = {"model_type": "mixtral", "hidden_size": 8, "num_hidden_layers": 2,
                "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 16,
                "num_local_experts": 4, "num_experts_per_tok": 2, "vocab_size": 10,
                "tie_word_embeddings": False}


def test_plan_numbers_by_hand():
    from moekit.distributed.plan import PlanInput, plan

    p = plan(TINY_MIXTRAL, PlanInput(devices=4, ep=2, pp=2, batch_tokens=64, seq=8))
    # per layer: attention 4·(8·8) = 256, norms 16, router 4·8 = 32, experts 4 x 3·8·16 = 1536;
    # final norm 8, embedding 80, head 80. dp = 4/2 = 2, edp = 4/(2·2) = 1.
    assert (p.dp, p.edp, p.moe_layers, p.experts_per_device) == (2, 1, 2, 2)
    dense = (2 * (256 + 16 + 32) + 8) / 2 + 80  # layers split over 2 stages + the embedding
    expert = 2 * 1536 / 2 / 2  # over pp and ep
    assert (p.dense_params_per_device, p.expert_params_per_device) == (dense, expert)
    assert p.gb_weights * 1e9 == pytest.approx((dense + expert) * 2)  # bf16
    assert p.gb_grads * 1e9 == pytest.approx((dense + expert) * 4)  # fp32 main grads
    # fp32 master + 2 fp32 moments = 12 B/param, ZeRO-1 over dp=2 (dense) and edp=1 (experts)
    assert p.gb_optimizer * 1e9 == pytest.approx(12 * (dense / 2 + expert))
    # 64 tokens over dp=2 -> 32 per device, 1 MoE layer per stage, K=2 copies of D=8 bf16,
    # 6 passes (fwd dispatch+combine, bwd, recompute fwd), half of them leave the device
    assert p.a2a_gb_per_step * 1e9 == pytest.approx(32 * 1 * 2 * 8 * 2 * 6 / 2)
    # activations, full recompute: in flight min(pp=2, 4 micro-batches) x 1 layer x D, plus one
    # MoE layer's working set (attention 48 + FFN 152 values/token), 8 tokens, bf16; fp32 logits
    assert p.gb_activations * 1e9 == pytest.approx((2 * 8 + 200) * 8 * 2 + 8 * 10 * 4)
    none = plan(TINY_MIXTRAL, PlanInput(devices=4, ep=2, pp=2, batch_tokens=64, seq=8, recompute="none"))
    assert none.gb_activations * 1e9 == pytest.approx(2 * 200 * 8 * 2 + 8 * 10 * 4)
    assert none.a2a_gb_per_step == pytest.approx(p.a2a_gb_per_step * 4 / 6)


def test_plan_rejects_bad_layouts():
    from moekit.distributed.plan import PlanInput, plan

    with pytest.raises(ValueError, match="ep=3 is invalid: must divide num_experts = 4"):
        plan(TINY_MIXTRAL, PlanInput(devices=6, ep=3))
    with pytest.raises(ValueError, match="devices=6 is invalid: must be divisible by tp·pp = 4"):
        plan(TINY_MIXTRAL, PlanInput(devices=6, ep=2, tp=2, pp=2))
    with pytest.raises(ValueError, match="optimizer='lion'"):
        plan(TINY_MIXTRAL, PlanInput(devices=4, ep=2, optimizer="lion"))


def test_plan_cli(tmp_path):
    from typer.testing import CliRunner

    from moekit.cli.main import app

    (tmp_path / "config.json").write_text(json.dumps(TINY_MIXTRAL))
    res = CliRunner().invoke(app, ["plan", "--config", str(tmp_path), "--devices", "4", "--ep", "2",
                                   "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["experts_per_device"] == 2
    bad = CliRunner().invoke(app, ["plan", "--config", str(tmp_path), "--devices", "4", "--ep", "3"])
    assert bad.exit_code == 2 and "ep=3" in bad.output


def test_expert_parallel_needs_a_process_group():
    from moekit import MoEConfig, MoELayer
    from moekit.distributed import expert_parallel

    with pytest.raises(RuntimeError, match="init_process_group"):
        expert_parallel(MoELayer(MoEConfig(d_model=8, num_experts=4, d_ff=8)))


# ----------------------------------------------------------------- worker side
def _init(rank: int, world: int, tmp: Path, scenario: str) -> None:
    import torch.distributed as dist

    timeout = timedelta(seconds=10 if scenario == "die" else PG_TIMEOUT_S)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store-{scenario}", rank=rank,
                            world_size=world, timeout=timeout)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item() if a.numel() else 0.0


def _layer_cfg(**kw):
    from moekit import MoEConfig

    base = dict(d_model=8, num_experts=8, top_k=2, d_ff=12, num_shared_experts=1,
                aux_loss_coef=0.01, z_loss_coef=0.001, init_std=0.3)  # O(1) outputs: 1e-5 is tight
    return MoEConfig(**{**base, **kw})


def _layer_case(cfg, rank, world, ep_size, bias=None, tokens=6):
    """One forward+backward at EP=ep_size vs the unsharded reference on every shard."""
    from moekit import MoELayer
    from moekit.distributed import expert_parallel, sync_gradients

    torch.manual_seed(0)
    ref = MoELayer(cfg)
    if bias is not None:
        with torch.no_grad():
            ref.router.bias.copy_(bias)
    xs = [torch.randn(tokens, cfg.d_model) for _ in range(world)]
    ts = [torch.randn(tokens, cfg.d_model) for _ in range(world)]
    ep = MoELayer(cfg)
    ep.load_state_dict(ref.state_dict())
    expert_parallel(ep, ep_size=ep_size)
    out = ep(xs[rank])
    loss = ((out.y - ts[rank]) ** 2).mean() + out.aux_loss
    loss.backward()
    sync_gradients(ep)
    ref_outs = [ref(x) for x in xs]
    ref_losses = [((o.y - t) ** 2).mean() + o.aux_loss for o, t in zip(ref_outs, ts, strict=True)]
    (sum(ref_losses) / world).backward()
    diffs = {"y": _maxdiff(out.y, ref_outs[rank].y), "loss": _maxdiff(loss, ref_losses[rank])}
    lo, hi = ep.experts.expert_offset, ep.experts.expert_offset + ep.experts.num_local_experts
    ref_params = dict(ref.named_parameters())
    for name, p in ep.named_parameters():
        g = ref_params[name].grad
        diffs[f"grad:{name}"] = _maxdiff(p.grad, g[lo:hi] if name.startswith("experts.") else g)
    assert max(diffs.values()) <= TOL, diffs
    assert out.y.abs().mean() > 0.05, "outputs too small for an absolute tolerance to mean much"
    return diffs, ep, out


def _recv_rows(ep_layer, out) -> int:
    """Rows this rank's experts received: the global counts summed over the EP group."""
    import torch.distributed as dist

    counts_E = out.stats.tokens_per_expert.clone()
    dist.all_reduce(counts_E, group=ep_layer.experts.groups.ep_group)
    lo = ep_layer.experts.expert_offset
    return int(counts_E[lo:lo + ep_layer.experts.num_local_experts].sum())


def scenario_layer(rank: int, world: int, tmp: Path) -> dict:
    from moekit import MoELayer
    from moekit.distributed import expert_parallel

    cases, recv, dropped = {}, {}, {}
    cases["ep4"], _, _ = _layer_case(_layer_cfg(), rank, world, 4)
    cases["ep2x2"], _, _ = _layer_case(_layer_cfg(), rank, world, 2)
    cap = _layer_cfg(dispatch="capacity", capacity_factor=0.75, drop_policy="probability")
    cases["capacity_ep4"], _, out = _layer_case(cap, rank, world, 4)
    dropped["capacity_ep4"] = int((out.stats.requested_per_expert - out.stats.tokens_per_expert).sum())
    # experts 6, 7 (rank 3's) can never win: rank 3 receives no row
    cfg_b = _layer_cfg(router_bias=True)
    cases["empty_rank"], ep, out = _layer_case(cfg_b, rank, world, 4,
                                               bias=torch.tensor([0.0] * 6 + [-1e4] * 2))
    recv["empty_rank"] = _recv_rows(ep, out)
    # experts 0 and 1 (rank 0's) are strongly preferred: very uneven splits
    cases["uneven"], ep, out = _layer_case(cfg_b, rank, world, 4, tokens=16,
                                           bias=torch.tensor([4.0, 4.0] + [0.0] * 6))
    recv["uneven"] = _recv_rows(ep, out)
    try:  # 6 experts over 4 ranks: a clear error naming both numbers
        expert_parallel(MoELayer(_layer_cfg(num_experts=6)), ep_size=4)
        div_err = False
    except ValueError as e:
        div_err = "num_experts=6" in str(e) and "ep=4" in str(e)
    return {"cases": cases, "recv_rows": recv, "dropped": dropped, "divisibility_error": div_err}


# --- the LM: 20 steps EP=2 vs EP=1, save at EP=2, resume at EP=1 and EP=4
STEPS, BATCH, SEQ = 20, 4, 8


def _lm():
    from moekit import MoEConfig
    from moekit.models.config import LMConfig
    from moekit.models.lm import MoELM

    moe = MoEConfig(d_model=16, num_experts=8, top_k=2, d_ff=16, router="topk_sigmoid",
                    num_shared_experts=1, seq_aux_loss_coef=0.01, bias_update_rate=0.01)
    cfg = LMConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2,
                   max_seq_len=SEQ, dense_d_ff=16, first_k_dense=1, moe=moe,
                   tie_embeddings=False)
    torch.manual_seed(0)
    return MoELM(cfg)


def _batch(step: int, rank: int, world: int):
    g = torch.Generator().manual_seed(1000 + step)
    starts = torch.randint(0, 32, (BATCH, 1), generator=g)
    ids = (starts + torch.arange(SEQ + 1)) % 32  # learnable: the next token is +1
    n = BATCH // world
    ids = ids[rank * n:(rank + 1) * n]
    return ids[:, :-1], ids[:, 1:]


def _train(model, opt, rank, world, distributed: bool, steps: range):
    from moekit.distributed import allreduce_loads, clip_grad_norm_, sync_gradients
    from moekit.moe.balance.bias import update_expert_bias

    losses, clipped = [], 0
    for step in steps:
        x, y = _batch(step, rank, world)
        out = model(x, targets_BS=y)
        loss = out.loss + out.aux_loss
        loss.backward()
        if distributed:
            sync_gradients(model)
            norm = clip_grad_norm_(model, 0.5)
        else:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        clipped += int(norm > 0.5)
        opt.step()
        opt.zero_grad()
        loads = [s.requested_per_expert.float() for s in out.stats if s is not None]
        if distributed:
            allreduce_loads(loads)
        for layer, load in zip(model.moe_layers(), loads, strict=True):
            update_expert_bias(layer.router.expert_bias, load, layer.cfg.bias_update_rate)
        losses.append(_mean_over_ranks(loss.detach(), distributed))
    return losses, clipped


def _mean_over_ranks(x: torch.Tensor, distributed: bool) -> float:
    import torch.distributed as dist

    if distributed:
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x.item()


def _bias(model):
    return [v for layer in model.moe_layers() for v in layer.router.expert_bias.tolist()]


def _opt(model):
    return torch.optim.AdamW(model.parameters(), lr=3e-2)


def _names(model):
    return [n for n, _ in model.named_parameters()]  # optimizer order (no tied weights here)


AFTER = range(STEPS, STEPS + 2)  # steps run after the save, by the saver and by each loader


def scenario_lm(rank: int, world: int, tmp: Path) -> dict:
    """On 4 ranks: 20 steps at EP=2 (x DP=2); save in the trainer's checkpoint format
    (weights + AdamW moments, experts gathered under global ids); 2 more steps. Then the
    same checkpoint resumed at EP=4 (all ranks) and at EP=1 (rank 0, a plain model through
    the trainer's single-process loader), each running the same 2 steps. Rank 0 also runs
    the EP=1 reference: 20 steps of an unwrapped model on the whole batch."""
    from safetensors.torch import load_file

    from moekit.distributed import expert_keys, expert_parallel, launch
    from moekit.training import checkpoint as ckpt

    out = {}
    if rank == 0:
        ref = _lm()
        out["ref_losses"], _ = _train(ref, _opt(ref), 0, 1, False, range(STEPS))
        out["ref_bias"] = _bias(ref)
    model = expert_parallel(_lm(), ep_size=2)
    # counts see every expert, not only this rank's slice (logged FLOPs depend on them)
    out["counts"] = [(model.num_parameters(), model.num_active_parameters()),
                     (_lm().num_parameters(), _lm().num_active_parameters())]
    opt = _opt(model)
    out["losses"], out["clipped_steps"] = _train(model, opt, rank, world, True, range(STEPS))
    out["bias"] = _bias(model)
    tensors, meta = ckpt.optimizer_to_flat(opt, _names(model))
    path = launch.save_checkpoint(ckpt.save_checkpoint, tmp / "ckpt", STEPS, model, tensors,
                                  {"optimizer": meta}, keep_last=1)
    out["after"], _ = _train(model, opt, rank, world, True, AFTER)
    # resume at EP=4
    model4 = expert_parallel(_lm(), ep_size=4)
    opt4 = _opt(model4)
    tensors, meta = launch.load_checkpoint(ckpt.load_checkpoint, path, model4)
    ckpt.optimizer_from_flat(opt4, _names(model4), tensors, meta["optimizer"])
    out["after_ep4"], _ = _train(model4, opt4, rank, world, True, AFTER)
    if rank == 0:  # resume at EP=1: no process group involved
        plain = _lm()
        opt1 = _opt(plain)
        tensors, meta = ckpt.load_checkpoint(path, plain)  # strict: no key missing
        ckpt.optimizer_from_flat(opt1, _names(plain), tensors, meta["optimizer"])
        keys = expert_keys(plain)
        saved = load_file(str(path / "model.safetensors"))
        out["expert_keys_in_model"] = len(keys)
        out["expert_keys_in_file"] = sum(k in saved and saved[k].shape[0] == 8 for k in keys)
        out["full_moments"] = all(tensors[f"optim/{k}/exp_avg"].shape[0] == 8 for k in keys)
        out["after_ep1"], _ = _train(plain, opt1, 0, 1, False, AFTER)
    out["trainer_losses"] = _trainer_losses(tmp, ep=2)  # `moekit train --ep 2` path, 4 ranks
    if rank == 0:
        out["trainer_ref_losses"] = _trainer_losses(tmp, ep=0)  # single process, plain model
    return out


def _trainer_losses(tmp: Path, ep: int) -> list[float]:
    """A 4-step run of moekit.training.train on a small text file; its logged losses."""
    from moekit.training import TrainConfig, train
    from moekit.training.metrics import read_metrics

    text = tmp / "corpus.txt"
    if not text.exists() and int(os.environ.get("RANK", 0)) == 0:
        text.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(400)))
    os.environ.setdefault("RANK", os.environ["MOEKIT_TEST_RANK"])  # what torchrun would set
    os.environ.setdefault("WORLD_SIZE", os.environ["MOEKIT_TEST_WORLD"])
    if ep:
        import torch.distributed as dist

        dist.barrier()  # the corpus is written
    moe = {"d_ff": 32, "aux_loss_coef": 0.0, "router": "topk_sigmoid", "bias_update_rate": 0.01}
    cfg = TrainConfig(model={"d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 2,
                             "dense_d_ff": 32, "moe": moe},
                      data={"path": str(text), "val_fraction": 0.1}, steps=4, batch_size=8,
                      seq_len=32, warmup=1, eval_every=4, eval_batches=1, log_every=100,
                      save_every=4, sample_tokens=0, device="cpu", tune="rules",
                      out_dir=str(tmp / f"run-ep{ep}"))
    train(cfg, ep=ep)
    if ep and int(os.environ["RANK"]) != 0:
        return []
    return [r["loss"] for r in read_metrics(tmp / f"run-ep{ep}") if r["kind"] == "train"]


def scenario_die(rank: int, world: int, tmp: Path) -> dict:
    from moekit import MoELayer
    from moekit.distributed import expert_parallel

    layer = expert_parallel(MoELayer(_layer_cfg()), ep_size=2)
    layer(torch.randn(4, 8)).y.sum().backward()  # one good step
    if rank == 1:
        os._exit(3)  # dies mid-run, without a goodbye
    layer(torch.randn(4, 8))  # rank 0 must raise here, not hang
    return {}


if __name__ == "__main__":
    import torch.distributed as dist

    scenario, rank, world, tmp = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    os.environ["MOEKIT_TEST_RANK"], os.environ["MOEKIT_TEST_WORLD"] = str(rank), str(world)
    torch.set_num_threads(1)
    from moekit import settings

    settings.set(tune="rules")  # every rank takes the same kernels, as the test process does
    _init(rank, world, tmp, scenario)
    result = globals()[f"scenario_{scenario}"](rank, world, tmp)
    (tmp / f"{scenario}-{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()  # no final barrier: ranks that finish early just leave

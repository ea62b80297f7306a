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
    """Run `world` worker processes; return (returncode, stderr tail) per rank."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    (tmp / f"store-{scenario}").unlink(missing_ok=True)
    procs = [subprocess.Popen([sys.executable, __file__, scenario, str(r), str(world), str(tmp)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
             for r in range(world)]
    deadline, results = time.monotonic() + timeout, []
    try:
        for p in procs:
            _, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            results.append((p.returncode, err[-3000:]))
    except subprocess.TimeoutExpired:
        pytest.fail(f"scenario {scenario!r} hung for more than {timeout}s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


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
    ep2 = run_ok(tmp_path, "train_ep2", 2)
    ep1 = run_ok(tmp_path, "train_ep1", 1)[0]
    ep4 = run_ok(tmp_path, "resume_ep4", 4)
    losses2, losses1 = ep2[0]["losses"], ep1["losses"]
    assert len(losses2) == len(losses1) == 20
    diffs = [abs(a - b) for a, b in zip(losses2, losses1)]
    assert max(diffs) <= 1e-4, diffs
    assert losses2[-1] < losses2[0]  # it trains
    assert ep2[0]["clipped_steps"] > 0  # the global grad norm was exercised
    assert ep2[0]["bias_moved"]  # the aux-loss-free bias moved, identically on both ranks
    assert ep2[0]["bias"] == ep2[1]["bias"] == pytest.approx(ep1["bias"], abs=1e-7)
    # next-step loss after save at EP=2, load at EP=1 and EP=4
    nxt = ep2[0]["next_loss"]
    assert abs(ep1["next_loss_loaded"] - nxt) <= 1e-5
    assert all(abs(r["next_loss_loaded"] - nxt) <= 1e-5 for r in ep4)
    assert ep1["expert_keys_in_file"] == ep1["expert_keys_in_model"] > 0


def test_dead_rank_fails_others_fast(tmp_path):
    t0 = time.monotonic()
    results = launch(tmp_path, "die", 2, timeout=90)
    elapsed = time.monotonic() - t0
    (rc0, err0), (rc1, _) = results
    assert rc1 == 3  # the rank that died
    assert rc0 != 0, "the surviving rank did not fail"
    assert "expert_parallel:" in err0 and "peer rank may have died" in err0, err0
    assert elapsed < 60


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
    ref_losses = [((o.y - t) ** 2).mean() + o.aux_loss for o, t in zip(ref_outs, ts)]
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


def _train(model, rank, world, distributed: bool):
    import torch.distributed as dist

    from moekit.distributed import allreduce_loads, clip_grad_norm_, sync_gradients
    from moekit.moe.balance.bias import update_expert_bias

    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    losses, clipped = [], 0
    for step in range(STEPS):
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
        for layer, load in zip(model.moe_layers(), loads):
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


def _next_loss(model, rank, world, distributed):
    with torch.no_grad():
        x, y = _batch(STEPS, rank, world)
        out = model(x, targets_BS=y)
        return _mean_over_ranks(out.loss + out.aux_loss, distributed)


def _bias(model):
    return [v for layer in model.moe_layers() for v in layer.router.expert_bias.tolist()]


def scenario_train_ep2(rank: int, world: int, tmp: Path) -> dict:
    from safetensors.torch import save_file

    from moekit.distributed import expert_parallel, gather_expert_state

    model = expert_parallel(_lm(), ep_size=2)
    losses, clipped = _train(model, rank, world, distributed=True)
    full = gather_expert_state(model)
    if rank == 0:
        tmp_file = tmp / "ckpt.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in full.items()}, str(tmp_file))
        os.replace(tmp_file, tmp / "ckpt.safetensors")
    return {"losses": losses, "clipped_steps": clipped, "bias": _bias(model),
            "bias_moved": any(abs(b) > 0 for b in _bias(model)),
            "next_loss": _next_loss(model, rank, world, True)}


def _load_ckpt(model, tmp: Path) -> int:
    from safetensors.torch import load_file

    from moekit.distributed import load_expert_parallel_state

    state = load_file(str(tmp / "ckpt.safetensors"))
    load_expert_parallel_state(model, state, strict=True)  # strict: no key missing
    return state


def scenario_train_ep1(rank: int, world: int, tmp: Path) -> dict:
    from moekit.distributed import expert_keys

    model = _lm()
    losses, _ = _train(model, rank, world, distributed=False)
    bias = _bias(model)
    fresh = _lm()
    state = _load_ckpt(fresh, tmp)
    keys = expert_keys(fresh)
    assert all(state[k].shape[0] == 8 for k in keys)  # global ids: all 8 experts in the file
    return {"losses": losses, "bias": bias, "next_loss_loaded": _next_loss(fresh, rank, world, False),
            "expert_keys_in_model": len(keys), "expert_keys_in_file": sum(k in state for k in keys)}


def scenario_resume_ep4(rank: int, world: int, tmp: Path) -> dict:
    from moekit.distributed import expert_parallel

    model = expert_parallel(_lm(), ep_size=4)
    _load_ckpt(model, tmp)
    return {"next_loss_loaded": _next_loss(model, rank, world, True)}


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
    torch.set_num_threads(1)
    _init(rank, world, tmp, scenario)
    result = globals()[f"scenario_{scenario}"](rank, world, tmp)
    (tmp / f"{scenario}-{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()

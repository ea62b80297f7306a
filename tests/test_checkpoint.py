"""Checkpoints: atomic writes, validity, pruning, and exact resume, including after
`kill -9` of a training subprocess at a random step and in the middle of a write."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moekit.cli.train import build_config
from moekit.data import ByteTokenizer, TokenData
from moekit.data.corpus import split_corpus
from moekit.models import MoELM
from moekit.training import TrainConfig, Trainer, train
from moekit.training.checkpoint import (
    is_valid,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
)
from moekit.training.run import model_config

SETS = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=2",
        "model.dense_d_ff=64", "model.max_seq_len=32", "model.moe.num_experts=4", "model.moe.d_ff=32",
        "seq_len=16", "batch_size=4", "grad_accum=2", "save_every=5", "eval_every=20",
        "log_every=1000", "sample_tokens=0", "keep_last=3", "warmup=5", "tune=rules"]
STEPS = 60
CLI = [sys.executable, "-c", "from moekit.cli.main import app; app()"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "text.txt"
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "(x)", ":", "\n"]
    path.write_text(" ".join(rng.choice(words) for _ in range(6000)))
    return path


@pytest.fixture(scope="module")
def reference(text_file, tmp_path_factory) -> Path:
    """An uninterrupted run of STEPS steps."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train(build_config(None, None, SETS + [f"steps={STEPS}"], str(text_file), str(out), False))
    return out


def records(run_dir: Path) -> list[tuple]:
    """Everything a run logs that must be bit-identical (no timings)."""
    keys = ("kind", "step", "loss", "aux_loss", "grad_norm", "lr", "val_loss", "skipped")
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out.append(tuple(r.get(k) for k in keys))
    return out


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run_dir / "checkpoints") / "model.safetensors"))


def assert_same_run(run_dir: Path, reference: Path) -> None:
    got, want = records(run_dir), records(reference)
    assert [r[1] for r in got if r[0] == "train"] == list(range(1, STEPS + 1))
    assert got == want
    a, b = final_weights(run_dir), final_weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def start(text_file: Path, out: Path, env: dict | None = None) -> subprocess.Popen:
    args = CLI + ["train", "--data", str(text_file), "--out", str(out), "--set", f"steps={STEPS}"]
    for s in SETS:
        args += ["--set", s]
    # One thread, like this test process (conftest): float sums depend on the thread count,
    # so bit-identical resume holds for the same thread count.
    env = os.environ | {"OMP_NUM_THREADS": "1"} | (env or {})
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def wait_for(cond, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"training exited (rc {proc.returncode}) before it could be killed: "
                        f"{proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out waiting for the training subprocess")
        time.sleep(0.02)


def last_logged_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    return max((json.loads(x)["step"] for x in lines if x.endswith("}")), default=0)


def kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def resume(text_file: Path, out: Path) -> None:
    train(build_config(None, None, [], None, str(out), True), resume=True)


def test_resume_after_kill9_at_a_random_step_is_bit_identical(text_file, reference, tmp_path):
    kill_at = random.SystemRandom().randint(7, 45)
    out = tmp_path / "run"
    # the pause at step 55 only guarantees the run cannot finish before a starved test kills it
    proc = start(text_file, out, env={"MOEKIT_TEST_CHECKPOINT_PAUSE": "55:60"})
    wait_for(lambda: last_logged_step(out) >= kill_at, proc)
    kill9(proc)
    killed_at = last_logged_step(out)
    for d in (out / "checkpoints").iterdir():  # whatever is there: complete or ignored
        assert is_valid(d) or d.name.startswith(".tmp-"), d
    resume(text_file, out)
    assert_same_run(out, reference), f"killed at step {killed_at}"


def test_kill9_during_a_checkpoint_write_never_loads_half_a_checkpoint(text_file, reference, tmp_path):
    out = tmp_path / "run"
    proc = start(text_file, out, env={"MOEKIT_TEST_CHECKPOINT_PAUSE": "10:60"})
    tmp_dir = out / "checkpoints" / f".tmp-step_00000010-{proc.pid}"
    wait_for(lambda: (tmp_dir / "model.safetensors").exists(), proc)
    kill9(proc)
    assert not is_valid(tmp_dir)  # half written: weights there, manifest not
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000005"]
    resume(text_file, out)
    assert not tmp_dir.exists()
    assert_same_run(out, reference)


def test_resume_after_ctrl_c_and_resume_of_a_finished_run(text_file, reference, tmp_path, monkeypatch):
    out = tmp_path / "run"
    step = Trainer.train_step

    def interrupted(self):
        if self.step == 23:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(build_config(None, None, SETS + [f"steps={STEPS}"], str(text_file), str(out), False))
    monkeypatch.setattr(Trainer, "train_step", step)
    assert latest_checkpoint(out / "checkpoints").name == "step_00000020"
    assert last_logged_step(out) == 23
    resume(text_file, out)
    assert_same_run(out, reference)
    resume(text_file, out)  # nothing left to do: evaluates and returns
    assert_same_run(out, reference)


def _trainer(seed: int = 0) -> Trainer:
    torch.manual_seed(seed)
    cfg = TrainConfig(model={"n_layers": 1, "d_model": 32, "n_heads": 2, "n_kv_heads": 2,
                             "dense_d_ff": 64, "max_seq_len": 32,
                             "moe": {"num_experts": 4, "d_ff": 32, "router": "topk_sigmoid",
                                     "bias_update_rate": 0.01}},
                      seq_len=16, batch_size=4, steps=20, keep_last=2)
    c = split_corpus("t", ["a"], [b"some text to train on. " * 100], 0.2)
    tok = ByteTokenizer()
    data = TokenData(tok, c, tok.encode(c.train_docs[0]), tok.encode(c.val_docs[0]))
    return Trainer(cfg, MoELM(model_config(cfg, 259)), data, torch.device("cpu"))


def test_trainer_state_round_trip(tmp_path):
    a = _trainer()
    for _ in range(3):
        a.train_step()
    path = a.save(tmp_path, {"note": "x"})
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json", "model.safetensors", "train_state.json", "train_state.safetensors"]
    b = _trainer(seed=123)  # different init and RNG: everything must come from the checkpoint
    state = b.restore(path)
    assert state["note"] == "x" and b.step == 3
    assert torch.equal(b.model.moe_layers()[0].router.expert_bias, a.model.moe_layers()[0].router.expert_bias)
    ra, rb = [a.train_step() for _ in range(2)], [b.train_step() for _ in range(2)]
    assert [r.loss for r in ra] == [r.loss for r in rb]
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True))


def test_invalid_checkpoints_are_skipped_and_old_ones_pruned(tmp_path):
    t = _trainer()
    paths = []
    for _ in range(3):
        t.train_step()
        paths.append(t.save(tmp_path, {}))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003"]  # keep_last=2
    with open(paths[-1] / "model.safetensors", "r+b") as f:  # a torn write
        f.truncate(100)
    assert latest_checkpoint(tmp_path).name == "step_00000002"
    (paths[1] / "manifest.json").unlink()
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        load_checkpoint(paths[1], t.model)


def test_checkpoint_of_another_shape_is_rejected(tmp_path):
    t = _trainer()
    path = t.save(tmp_path, {})
    other = MoELM(model_config(TrainConfig(model={"n_layers": 2, "d_model": 32, "n_heads": 2,
                                                  "n_kv_heads": 2, "max_seq_len": 32}, seq_len=16), 259))
    with pytest.raises((ValueError, RuntimeError)):
        load_checkpoint(path, other)


def test_a_kill_while_pruning_leaves_no_broken_step_folder(tmp_path, monkeypatch):
    """Pruning renames a checkpoint to a temp name before deleting it: a deletion cut short
    (here: the first file removed, then the process 'dies') leaves only a temp folder,
    which the next save clears; every step_ folder stays complete."""
    from moekit.training import checkpoint as ckpt

    model = MoELM(model_config(TrainConfig(), 259))
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        ckpt.save_checkpoint(root, step, model, {}, {"step": step}, keep_last=2)

    def dies_midway(path, ignore_errors=False):  # noqa: ARG001
        next(p for p in Path(path).iterdir()).unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.shutil, "rmtree", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(root, 3, model, {}, {"step": 3}, keep_last=2)
    steps = sorted(d for d in root.iterdir() if d.name.startswith("step_"))
    assert [d.name for d in steps] == ["step_00000002", "step_00000003"]
    assert all(ckpt.is_valid(d) for d in steps)
    monkeypatch.undo()
    ckpt.save_checkpoint(root, 4, model, {}, {"step": 4}, keep_last=2)
    assert sorted(d.name for d in root.iterdir()) == ["step_00000003", "step_00000004"]

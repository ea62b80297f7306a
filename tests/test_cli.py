"""The `moekit train / generate / plot / compare` commands, end to end on tiny settings."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from moekit.cli.main import app
from moekit.training.checkpoint import latest_checkpoint

TINY = ["model.n_layers=2", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=2",
        "model.max_seq_len=64", "model.moe.num_experts=4", "model.moe.d_ff=32",
        "seq_len=32", "batch_size=4", "steps=12", "eval_every=6", "save_every=6",
        "log_every=6", "eval_batches=2", "sample_tokens=20"]


def sets(extra: list[str] = ()) -> list[str]:
    out = []
    for s in TINY + list(extra):
        out += ["--set", s]
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "code.py"
    rng = random.Random(0)
    path.write_text("".join(f"def f{i}(x):\n    return x * {rng.randint(0, 9)}\n\n" for i in range(400)))
    return path


def invoke(args: list[str]):
    return CliRunner().invoke(app, args, catch_exceptions=False)


def test_train_generate_plot(text_file, tmp_path):
    out = tmp_path / "run"
    r = invoke(["train", "--data", str(text_file), "--out", str(out)] + sets())
    assert r.exit_code == 0, r.output
    assert "validation loss" in r.output and "unigram baseline" in r.output and "sample" in r.output
    for name in ("run.json", "metrics.jsonl", "loss.png", "expert_load.png", "sample.txt"):
        assert (out / name).is_file(), name
    assert latest_checkpoint(out / "checkpoints").name == "step_00000012"
    meta = json.loads((out / "run.json").read_text())
    assert len(meta["corpus"]["fingerprint"]) == 64 and meta["train"]["steps"] == 12
    r = invoke(["generate", "--run", str(out), "--prompt", "def f(", "--max-new-tokens", "10"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("def f(")
    (out / "loss.png").unlink()
    r = invoke(["plot", str(out)])
    assert r.exit_code == 0 and (out / "loss.png").is_file()


def test_bpe_tokenizer_is_saved_and_reloaded(text_file, tmp_path):
    pytest.importorskip("tokenizers")
    out = tmp_path / "run"
    r = invoke(["train", "--data", str(text_file), "--out", str(out)]
               + sets(["data.tokenizer=bpe", "data.vocab_size=320", "steps=3"]))
    assert r.exit_code == 0, r.output
    assert (out / "tokenizer.json").is_file()
    r = invoke(["generate", "--run", str(out), "--prompt", "def", "--max-new-tokens", "5",
                "--temperature", "0"])
    assert r.exit_code == 0 and r.output.startswith("def")


def test_toml_config_and_set_precedence(text_file, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('steps = 2\nlr = 0.01\n[data]\nval_fraction = 0.1\n[model]\nn_layers = 1\n')
    out = tmp_path / "run"
    r = invoke(["train", "--config", str(cfg), "--data", str(text_file), "--out", str(out)]
               + sets(["steps=3"])[:-2] + ["--set", "steps=3", "--set", "model.n_layers=1"])
    assert r.exit_code == 0, r.output
    meta = json.loads((out / "run.json").read_text())
    assert meta["train"]["steps"] == 3 and meta["train"]["lr"] == 0.01
    assert meta["train"]["data"]["val_fraction"] == 0.1 and meta["model"]["n_layers"] == 1


@pytest.mark.parametrize("args,message", [
    (["--set", "stepz=3"], "unknown key(s) ['stepz']"),
    (["--set", "steps=many"], "train.steps='many' is invalid"),
    (["--set", "model.moe.top_k=9"], "MoEConfig.top_k=9 is invalid"),
    (["--set", "model.nlayers=2"], "LMConfig: unknown field(s) ['nlayers']"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--data", "/no/such/path"], "--data '/no/such/path' does not exist"),
    (["--resume"], "--resume needs --out"),
    (["--config", "/no/such.toml"], "does not exist"),
])
def test_bad_arguments_give_clear_errors(args, message, tmp_path):
    r = invoke(["train", "--out", str(tmp_path / "r")] + args if "--resume" not in args else ["train"] + args)
    assert r.exit_code == 2, r.output
    assert message in r.output


def test_empty_data_and_run_folder_errors(text_file, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = invoke(["train", "--data", str(empty), "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "holds no text" in r.output
    (tmp_path / "e.txt").write_text("")
    r = invoke(["train", "--data", str(tmp_path / "e.txt"), "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "holds no text" in r.output
    r = invoke(["train", "--out", str(tmp_path / "none"), "--resume"])
    assert r.exit_code == 2 and "holds no run" in r.output
    out = tmp_path / "run"
    assert invoke(["train", "--data", str(text_file), "--out", str(out)] + sets(["steps=1"])).exit_code == 0
    r = invoke(["train", "--data", str(text_file), "--out", str(out)] + sets(["steps=1"]))
    assert r.exit_code == 2 and "already holds a run" in r.output
    r = invoke(["generate", "--run", str(tmp_path / "none"), "--prompt", "x"])
    assert r.exit_code == 2 and "not a run folder" in r.output
    r = invoke(["plot", str(tmp_path / "none")])
    assert r.exit_code == 2 and "no metrics" in r.output


def test_compare_writes_a_report(text_file, tmp_path):
    out = tmp_path / "cmp"
    r = invoke(["compare", "--data", str(text_file), "--out", str(out)]
               + sets(["steps=8", "eval_every=4", "sample_tokens=0"]))
    assert r.exit_code == 0, r.output
    report = (out / "report.md").read_text()
    assert "validation loss at equal training FLOPs" in report and "FLOPs to reach" in report
    assert (out / "compare.png").is_file()
    numbers = json.loads((out / "report.json").read_text())
    moe_flops = [json.loads(x)["flops"] for x in (out / "tiny" / "metrics.jsonl").read_text().splitlines()
                 if '"eval"' in x][-1]
    dense_flops = [json.loads(x)["flops"] for x in (out / "dense" / "metrics.jsonl").read_text().splitlines()
                   if '"eval"' in x][-1]
    assert abs(dense_flops / moe_flops - 1) < 0.15  # steps scaled to equal compute
    assert numbers["moe_val_at_budget"] is not None and numbers["dense_val_at_budget"] is not None
    assert "moe_complete_runs" not in numbers  # no --budgets: the curve only


def test_compare_budgets_are_complete_shorter_runs(text_file, tmp_path):
    out = tmp_path / "cmp"
    r = invoke(["compare", "--data", str(text_file), "--out", str(out), "--budgets", "0.5,1"]
               + sets(["steps=8", "eval_every=4", "warmup=4", "sample_tokens=0"]))
    assert r.exit_code == 0, r.output
    half = json.loads((out / "tiny@0.5" / "run.json").read_text())["train"]
    assert half["steps"] == 4 and half["warmup"] == 4  # its own whole schedule, not a cut
    numbers = json.loads((out / "report.json").read_text())
    runs = numbers["moe_complete_runs"]
    assert [x["fraction"] for x in runs] == [0.5, 1.0]
    assert runs[0]["flops"] == pytest.approx(runs[1]["flops"] / 2, rel=0.01)
    assert "whole schedule" in (out / "report.md").read_text()
    r = invoke(["compare", "--data", str(text_file), "--out", str(tmp_path / "x"), "--budgets", "0,1"])
    assert r.exit_code == 2 and "--budgets='0,1' is invalid" in r.output


def _fake_run(folder, points):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(
        json.dumps({"kind": "eval", "flops": x, "val_loss": y}) + "\n" for x, y in points))
    return folder


def test_flops_to_reach_and_complete_runs(tmp_path):
    from moekit.analysis.report import complete_runs, flops_to_reach

    assert flops_to_reach([1, 2, 3], [5, 4, 3], 3.5) == pytest.approx(2.5)
    assert flops_to_reach([1, 2, 3], [5, 4, 3], 6) == 1  # already there at the first point
    assert flops_to_reach([1, 2, 3], [5, 4, 3], 2) is None  # never
    runs = {0.5: _fake_run(tmp_path / "a", [(1, 9), (2, 4.0)]), 1.0: _fake_run(tmp_path / "b", [(2, 8), (4, 3.0)])}
    got = complete_runs(runs, target=3.5)  # final losses 4.0 at 2, 3.0 at 4 -> 3.5 at 3
    assert [r["final_val"] for r in got["moe_complete_runs"]] == [4.0, 3.0]
    assert got["moe_flops_to_dense_final_complete"] == pytest.approx(3.0)
    assert not got["moe_complete_is_upper_bound"]
    got = complete_runs(runs, target=4.5)  # the smallest run is already below: an upper bound
    assert got["moe_flops_to_dense_final_complete"] == 2 and got["moe_complete_is_upper_bound"]

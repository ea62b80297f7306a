"""from_pretrained on large and hostile folders: memory, sizes checked first, shard paths.

- the peak resident memory of a load stays within the weights + the largest shard
  (+ 24 MiB), measured in a fresh process on a checkpoint written by transformers;
- a config.json that does not fit its safetensors, or a model that does not fit in
  memory, is refused with a ValueError before anything is allocated (run under an
  address-space limit, so a load that did allocate fails loudly instead of swapping);
- an index may not send a shard path outside the folder, nor name a non-string.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moekit

transformers = pytest.importorskip("transformers")
linux_only = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
SRC = str(Path(moekit.__file__).resolve().parents[1])
MIB = 2**20


def _mixtral(folder: Path, *, vocab=64, hidden=32, layers=2, shard="5GB", dtype=torch.float32, **kw):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("mixtral", hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                               num_local_experts=4, num_experts_per_tok=2, vocab_size=vocab,
                               max_position_embeddings=256, **kw)
    AutoModelForCausalLM.from_config(cfg).to(dtype).save_pretrained(folder, max_shard_size=shard)
    return folder


def _run(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=timeout)


# ---- peak memory

PEAK = r"""
import json, sys, moekit
moekit.from_pretrained(sys.argv[1])  # imports and first-call paths, on a tiny folder
status = lambda k: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(k))
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
before = status("VmRSS:")
model = moekit.from_pretrained(sys.argv[2])
print(json.dumps({"peak": status("VmHWM:") - before, "dtype": str(model.embed.weight.dtype)}))
"""


@linux_only
def test_peak_memory_is_weights_plus_one_shard(tmp_path):
    big = _mixtral(tmp_path / "big", vocab=16000, hidden=256, shard="12MB", dtype=torch.bfloat16)
    tiny = _mixtral(tmp_path / "tiny")
    files = list(big.glob("*.safetensors"))
    weights, largest = sum(f.stat().st_size for f in files), max(f.stat().st_size for f in files)
    assert len(files) >= 3 and weights > 20 * MIB
    code = f"import sys; sys.argv[1:] = [{str(tiny)!r}, {str(big)!r}]\n" + PEAK
    out = _run(code)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.splitlines()[-1])
    assert r["dtype"] == "torch.bfloat16"  # the checkpoint's dtype, never an fp32 build first
    assert r["peak"] <= weights + largest + 24 * MIB, \
        f"peak +{r['peak'] / MIB:.1f} MiB; weights {weights / MIB:.1f} + shard {largest / MIB:.1f}"


# ---- refused before allocating (in a child whose address space is capped)

CAPPED = r"""
import resource, sys, moekit
from moekit.models.hf.loader import from_pretrained
vm = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + 2 * 2**30, resource.RLIM_INFINITY))
try:
    from_pretrained(sys.argv[1])
except ValueError as e:
    print("ValueError:", e)
"""


def _capped_load(folder: Path) -> str:
    out = _run(f"import sys; sys.argv[1:] = [{str(folder)!r}]\n" + CAPPED)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


MIXTRAL_8X7B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, intermediate_size=14336, num_local_experts=8,
                    num_experts_per_tok=2, vocab_size=32000)


@linux_only
def test_config_larger_than_its_files_refused_before_allocating(tmp_path):
    """Mixtral-8x7B's config.json (~188 GB in fp32) beside a tiny model.safetensors."""
    d = _mixtral(tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, **MIXTRAL_8X7B}))
    assert (d / "model.safetensors").stat().st_size < 500_000
    out = _capped_load(d)
    assert "ValueError: tensor model.embed_tokens.weight has shape (64, 32); config.json " \
           "implies (32000, 4096)" in out


def _sparse_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> int:
    """A safetensors file whose header lists `tensors` (meta: shapes and dtypes only) and
    whose data is a hole: the file takes no disk space. Returns its data size."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    names = {torch.bfloat16: "BF16", torch.float32: "F32"}
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(8 + len(text) + offset)
    return offset


@linux_only
def test_model_larger_than_free_memory_refused_before_allocating(tmp_path):
    """Headers that match the config, of twice the free memory (a sparse file)."""
    from moekit.models.hf.families import lm_config_from_hf
    from moekit.models.hf.loader import available_bytes
    from moekit.models.hf.model import HFMoELM
    from moekit.models.hf.saver import hf_tensors

    free = available_bytes(torch.device("cpu"))
    per_layer = 3 * 4096 * 14336 * 8 * 2  # bf16 experts of one Mixtral-8x7B layer
    layers = math.ceil(2 * free / per_layer)
    hf = {"model_type": "mixtral", **MIXTRAL_8X7B, "num_hidden_layers": layers,
          "max_position_embeddings": 256, "torch_dtype": "bfloat16"}
    with torch.device("meta"):
        model = HFMoELM(lm_config_from_hf(hf)).to(torch.bfloat16)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    size = _sparse_safetensors(tmp_path / "model.safetensors", hf_tensors(model))
    assert size > 2 * free
    out = _capped_load(tmp_path)
    assert "ValueError: the model needs" in out and "GiB is free there" in out


def test_check_fits_names_need_and_free():
    from moekit.models.hf.loader import check_fits

    cpu = torch.device("cpu")
    check_fits(10 * 2**30, 11 * 2**30, cpu, torch.bfloat16)
    check_fits(10 * 2**30, None, cpu, torch.bfloat16)  # unknown free memory: not checked
    with pytest.raises(ValueError, match=r"needs 10.00 GiB .* bfloat16 on cpu, and only 9.00 GiB"):
        check_fits(10 * 2**30, 9 * 2**30, cpu, torch.bfloat16)


# ---- shard paths in the index

@pytest.fixture
def sharded(tmp_path):
    return _mixtral(tmp_path / "m", shard="20KB")


def _point(folder: Path, name: str, value) -> None:
    index = folder / "model.safetensors.index.json"
    idx = json.loads(index.read_text())
    idx["weight_map"][name] = value
    index.write_text(json.dumps(idx))


def test_shard_outside_the_folder_refused(sharded, tmp_path):
    """The index points one tensor at a (valid) shard in a sibling folder."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    idx = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = idx["weight_map"]["model.norm.weight"]
    (elsewhere / shard).write_bytes((sharded / shard).read_bytes())
    _point(sharded, "model.norm.weight", f"../elsewhere/{shard}")
    with pytest.raises(ValueError, match=r"weight_map\['model.norm.weight'\] = '../elsewhere/.*"
                                         "is not a file inside the checkpoint folder"):
        moekit.from_pretrained(sharded)


@pytest.mark.parametrize("value", ["/etc/passwd", "a/../../x.safetensors", "", ".", "a/.."])
def test_absolute_or_escaping_shard_path_refused(sharded, value):
    _point(sharded, "model.norm.weight", value)
    with pytest.raises(ValueError, match="is not a file inside the checkpoint folder"):
        moekit.from_pretrained(sharded)


@pytest.mark.parametrize("value", [5, None, ["model-00001.safetensors"], {"a": 1}])
def test_non_string_shard_name_is_a_clear_error(sharded, value):
    _point(sharded, "model.norm.weight", value)
    with pytest.raises(ValueError, match=r"weight_map\['model.norm.weight'\] is .*; expected the "
                                         "name of a safetensors file"):
        moekit.from_pretrained(sharded)


def test_shard_in_a_subfolder_and_symlinked_shard_load(sharded, tmp_path):
    """Inside the folder is fine, also through a symlink (the HF hub cache links every
    file of a snapshot to a blob elsewhere)."""
    want = moekit.from_pretrained(sharded).state_dict()
    idx = json.loads((sharded / "model.safetensors.index.json").read_text())
    shard = idx["weight_map"]["model.norm.weight"]
    (sharded / "sub").mkdir()
    blob = tmp_path / "blob"
    (sharded / shard).rename(blob)
    os.symlink(blob, sharded / "sub" / shard)
    for name, f in idx["weight_map"].items():
        if f == shard:
            _point(sharded, name, f"sub/{shard}")
    got = moekit.from_pretrained(sharded).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_index_names_a_tensor_its_shard_lacks(sharded):
    idx = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(idx["weight_map"].values()))
    other = next(s for s in shards if s != idx["weight_map"]["model.norm.weight"])
    _point(sharded, "model.norm.weight", other)
    with pytest.raises(ValueError, match=f"puts tensor 'model.norm.weight' in {other}, which does not hold it"):
        moekit.from_pretrained(sharded)

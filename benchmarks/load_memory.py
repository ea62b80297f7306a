"""Peak memory of loading an HF checkpoint: moekit.from_pretrained vs transformers.

    python benchmarks/load_memory.py                    # writes a ~175 MiB bf16 Mixtral-shaped
                                                        # checkpoint with transformers, 4 shards
    python benchmarks/load_memory.py --folder DIR       # an existing HF folder
    python benchmarks/load_memory.py --moekit-src DIR   # another moekit tree (a before/after)

Each loader runs in a fresh process (Linux): imports and a warm-up load of a tiny
checkpoint first, then the peak resident set (VmHWM, reset through /proc/self/clear_refs)
minus the resident set just before the load. Printed beside the bound moekit promises:
weights in their dtype + the largest shard.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# this folder holds a kernels.py, and transformers imports a `kernels` package: run as a
# script, the folder must not come first on the path
sys.path = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
MIB = 2**20
CHILD = r"""
import json, sys, torch
torch.set_num_threads(1)
which, folder, warm = sys.argv[1:4]
if which == "moekit":
    import moekit
    load = lambda f: moekit.from_pretrained(f)
else:
    from transformers import AutoModelForCausalLM
    load = lambda f: AutoModelForCausalLM.from_pretrained(f, dtype="auto")
load(warm)

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # VmHWM := VmRSS
before = status("VmRSS:")
model = load(folder)
print(json.dumps({"peak": status("VmHWM:") - before, "kept": status("VmRSS:") - before,
                  "dtype": str(next(model.parameters()).dtype)}))
"""


def write_checkpoint(folder: Path, vocab: int, hidden: int, layers: int, shard: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("mixtral", hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                               num_local_experts=8, num_experts_per_tok=2, vocab_size=vocab,
                               max_position_embeddings=4096, dtype="bfloat16")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size=shard)


def measure(which: str, folder: Path, warm: Path, src: str | None) -> dict:
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    out = subprocess.run([sys.executable, "-c", CHILD, which, str(folder), str(warm)],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{which} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", type=Path, help="an HF checkpoint folder (default: write one)")
    ap.add_argument("--moekit-src", help="PYTHONPATH of the moekit tree to measure")
    ap.add_argument("--layers", type=int, default=4, help="layers of the written checkpoint")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, warm = args.folder or Path(tmp, "ckpt"), Path(tmp, "warm")
        if args.folder is None:
            write_checkpoint(folder, vocab=32000, hidden=512, layers=args.layers, shard="50MB")
        write_checkpoint(warm, vocab=64, hidden=32, layers=1, shard="5GB")
        files = sorted(folder.glob("*.safetensors"))
        weights, largest = sum(f.stat().st_size for f in files), max(f.stat().st_size for f in files)
        print(f"checkpoint {folder}: {weights / MIB:.1f} MiB in {len(files)} file(s), "
              f"largest {largest / MIB:.1f} MiB; bound weights + largest shard = "
              f"{(weights + largest) / MIB:.1f} MiB")
        for which in ("moekit", "transformers"):
            r = measure(which, folder, warm, args.moekit_src if which == "moekit" else None)
            print(f"{which:<13} peak +{r['peak'] / MIB:7.1f} MiB   kept +{r['kept'] / MIB:7.1f} MiB"
                  f"   ({r['dtype']})")


if __name__ == "__main__":
    main()

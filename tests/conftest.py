"""Shared test setup.

One intra-op thread per test process: the suite runs under pytest-xdist (one worker
per core), and the tensors here are tiny, so OpenMP threads buy nothing; worse, with
more threads than free cores every parallel op waits at a barrier for a descheduled
thread (measured: a tiny MoELayer forward 3 ms with 1 thread, ~60 ms with 2 on a
loaded 2-core machine).

Choices that would otherwise be timed per machine (ops/tune.py) follow fixed rules
here, so every test takes the same paths on every machine; tests that check a path
pass it as a value (CpuPath, settings fields), never by patching module globals.

DEVICES: every device this machine has ("cpu", and "cuda" where torch sees a GPU), for
tests parametrized over devices, so `pytest` on a CUDA machine exercises CUDA too.
"""

from __future__ import annotations

import pytest
import torch

from moekit import settings

torch.set_num_threads(1)
settings.set(tune="rules")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

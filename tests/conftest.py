"""Shared test setup.

One intra-op thread per test process: the suite runs under pytest-xdist (one worker
per core), and the tensors here are tiny, so OpenMP threads buy nothing; worse, with
more threads than free cores every parallel op waits at a barrier for a descheduled
thread (measured: a tiny MoELayer forward 3 ms with 1 thread, ~60 ms with 2 on a
loaded 2-core machine).
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

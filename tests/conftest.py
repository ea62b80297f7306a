"""Shared test setup: every test starts from the same RNG state, single-threaded torch
(the suite runs with pytest-xdist on 2 cores; intra-op threads would oversubscribe)."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

"""The decode path: ops/rowmv.py's compiled mat-vec kernel against its torch reference,
and the grouped backend's decode branch against the chunked GEMM path and the loop
oracle."""

from __future__ import annotations

import shutil

import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.moe.experts import decode, grouped
from moekit.ops import ext, gemm, rowmv

F32 = dict(atol=1e-5, rtol=1e-5)
needs_kernel = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler")


@needs_kernel
def test_kernel_builds_where_a_compiler_exists():
    """Otherwise every test below would quietly check the reference against itself."""
    assert rowmv.applies(torch.zeros(1, 4), torch.zeros(1, 2, 4))


@needs_kernel
@pytest.mark.parametrize("counts", [[1, 0, 2, 0], [0, 0, 0, 5], [3, 1, 4, 1], [0, 0, 0, 0], [9, 0, 6, 2]])
@pytest.mark.parametrize("K", [7, 32, 100])
def test_kernel_matches_reference(counts, K):
    g = torch.Generator().manual_seed(K)
    R = sum(counts)
    a = torch.randn(R, K, generator=g)
    w = torch.randn(len(counts), 37, K, generator=g)
    off = torch.tensor([0, *counts]).cumsum(0)
    got = rowmv.grouped_rows_linear(a, w, off)
    ref = (a.double()[:, None, :] * w.double()[torch.repeat_interleave(torch.arange(4), torch.tensor(counts))]).sum(-1)
    assert got.shape == (R, 37)
    torch.testing.assert_close(got.double(), ref, **F32)
    torch.testing.assert_close(got, rowmv.reference(a, w, off), **F32)


@needs_kernel
def test_kernel_strided_weight_rows_and_bad_offsets():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 16, 40, generator=g)[:, ::2, :24]  # rows contiguous, strides not
    a = torch.randn(4, 24, generator=g)
    off = torch.tensor([0, 1, 1, 4])
    torch.testing.assert_close(rowmv.grouped_rows_linear(a, w, off), rowmv.reference(a, w, off), **F32)
    with pytest.raises(RuntimeError, match="offsets must run from 0 to R = 4"):
        rowmv.grouped_rows_linear(a, w, torch.tensor([0, 1, 1, 3]))
    with pytest.raises(RuntimeError, match="offsets must not decrease"):
        rowmv.grouped_rows_linear(a, w, torch.tensor([0, 3, 1, 4]))


def test_reference_runs_where_the_kernel_does_not(monkeypatch):
    """fp64, a gradient to keep, or no build: the torch reference, same numbers."""
    monkeypatch.setitem(ext._state, "built", False)
    a = torch.randn(3, 8, dtype=torch.float64)
    w = torch.randn(2, 5, 8, dtype=torch.float64)
    off = torch.tensor([0, 2, 3])
    assert not rowmv.applies(a.float(), w.float())
    got = rowmv.grouped_rows_linear(a, w, off)
    torch.testing.assert_close(got, torch.cat([a[:2] @ w[0].T, a[2:] @ w[1].T]))


def _layer(expert: str, backend: str, top_k: int = 2) -> MoELayer:
    cfg = MoEConfig(d_model=48, num_experts=8, top_k=top_k, d_ff=40, expert=expert,
                    expert_backend=backend, num_shared_experts=1, shared_d_ff=24, init_std=0.3)
    torch.manual_seed(0)
    return MoELayer(cfg).eval()


@needs_kernel
@pytest.mark.parametrize("expert", ["swiglu", "geglu", "gelu", "relu"])
@pytest.mark.parametrize("T", [1, 3, 8])
def test_decode_branch_matches_chunked_path_and_oracle(monkeypatch, expert, T):
    fast, oracle = _layer(expert, "grouped"), _layer(expert, "loop")
    oracle.load_state_dict(fast.state_dict())
    x = torch.randn(1, T, 48, generator=torch.Generator().manual_seed(T))
    taken = []
    real = decode.decode_experts
    monkeypatch.setattr(decode, "decode_experts", lambda *a: taken.append(1) or real(*a))
    with torch.no_grad():
        y_decode = fast(x).y
        with gemm.backend("torch"):
            y_oracle = oracle(x).y
        monkeypatch.setattr(decode, "DECODE_MAX_ROWS", -1)  # forces the chunked GEMM path
        y_chunked = fast(x).y
    assert taken == [1]
    torch.testing.assert_close(y_decode, y_oracle, **F32)
    torch.testing.assert_close(y_decode, y_chunked, **F32)


def test_decode_branch_not_taken_for_training_or_many_rows(monkeypatch):
    taken = []
    monkeypatch.setattr(decode, "decode_experts", lambda *a: taken.append(1))
    layer = _layer("swiglu", "grouped")
    layer(torch.randn(1, 2, 48)).y.sum().backward()  # a gradient is needed
    with torch.no_grad():
        layer(torch.randn(4, 64, 48))  # 512 rows on 8 experts: GEMMs
    assert taken == []
    assert grouped.MIN_ROWS > decode.DECODE_MAX_ROWS


@needs_kernel
@pytest.mark.parametrize("M", [1, 4])
def test_gemm_linear_uses_the_kernel_for_decode_rows(monkeypatch, M):
    calls = []
    real = rowmv.grouped_rows_linear
    monkeypatch.setattr(rowmv, "grouped_rows_linear", lambda *a: calls.append(1) or real(*a))
    a, w, b = torch.randn(M, 256) * 0.25, torch.randn(300, 256) * 0.25, torch.randn(300)
    with torch.no_grad():
        y = gemm.linear(a, w, b)
        gemm.linear(torch.randn(5, 256), w)  # 5 rows: GEMM kernels
    assert calls == [1]
    torch.testing.assert_close(y, torch.nn.functional.linear(a, w, b), **F32)


def test_routing_stats_are_computed_when_read_and_once(monkeypatch):
    """A decode step that never reads its stats pays nothing for them."""
    from moekit.moe import types as stats_mod

    calls = []
    real = stats_mod._entropy
    monkeypatch.setattr(stats_mod, "_entropy", lambda p: calls.append(1) or real(p))
    layer = _layer("swiglu", "grouped")
    with torch.no_grad():
        out = layer(torch.randn(1, 3, 48))
    assert calls == []
    first = out.stats.router_entropy
    assert calls == [1] and out.stats.router_entropy is first
    assert 0 < float(first) <= torch.log(torch.tensor(8.0)) + 1e-6
    with pytest.raises(AttributeError, match="no field 'entropy'"):
        out.stats.entropy  # noqa: B018

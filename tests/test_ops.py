"""ops/sort.py: grouping slots by expert, permute and unpermute."""

from __future__ import annotations

import pytest
import torch

from moekit.ops import ext
from moekit.ops import sort as sort_ops
from moekit.ops.sort import permute, sort_slots_by_expert, unpermute


def test_permute_then_unpermute_is_the_identity():
    x = torch.randn(7, 5, dtype=torch.float64)
    perm = torch.randperm(7)
    rows = permute(x, perm)
    torch.testing.assert_close(rows, x[perm], atol=0, rtol=0)
    torch.testing.assert_close(unpermute(rows, perm, 7), x, atol=0, rtol=0)


def test_unpermute_of_k_copies_with_weights_summing_to_one_is_the_identity():
    T, K = 6, 3
    x = torch.randn(T, 4, dtype=torch.float64)
    token_idx = torch.arange(T).repeat_interleave(K)[torch.randperm(T * K)]
    w = torch.rand(T, K, dtype=torch.float64)
    w = w / w.sum(-1, keepdim=True)
    # weight of each row: the next unused column of its token
    col = torch.zeros(T, dtype=torch.long)
    weights_R = torch.empty(T * K, dtype=torch.float64)
    for r, t in enumerate(token_idx.tolist()):
        weights_R[r] = w[t, col[t]]
        col[t] += 1
    y = unpermute(permute(x, token_idx), token_idx, T, weights_R)
    torch.testing.assert_close(y, x, atol=1e-12, rtol=1e-12)


def test_unpermute_leaves_untouched_tokens_zero_and_handles_empty():
    rows = torch.ones(2, 3)
    y = unpermute(rows, torch.tensor([0, 0]), 3, torch.tensor([0.25, 0.5]))
    assert y.tolist() == [[0.75] * 3, [0.0] * 3, [0.0] * 3]
    empty = unpermute(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 4)
    assert empty.shape == (4, 3) and empty.abs().sum() == 0


def test_sort_slots_by_expert_hand_case():
    # T=3, K=2; slots t*K+k: 0:e2 1:e0 2:e0 3:e1 4:e2 5:-1
    ids = torch.tensor([[2, 0], [0, 1], [2, -1]])
    slot_idx, counts = sort_slots_by_expert(ids, 3)
    assert counts.tolist() == [2, 1, 2]
    # expert 0: first choices (slot 2) before second choices (slot 1); expert 2: slots 0, 4
    assert slot_idx.tolist() == [2, 1, 3, 0, 4]


@pytest.mark.parametrize("T,K,E", [(0, 2, 4), (1, 1, 1), (9, 2, 4), (16, 3, 5), (40, 4, 7)])
def test_sort_slots_by_expert_host_path_equals_tensor_path(T, K, E):
    """Decode-sized inputs are sorted in Python (ops/sort.py HOST_MAX_SLOTS): same result."""
    ids = torch.randint(-1, E, (T, K), generator=torch.Generator().manual_seed(T * K + E))
    tensor = sort_slots_by_expert(ids, E, host_max_slots=-1)
    host = sort_slots_by_expert(ids, E, host_max_slots=10**9)
    for a, b in zip(host, tensor, strict=True):
        assert a.dtype == b.dtype == torch.int64 and a.tolist() == b.tolist()


@pytest.mark.skipif(not ext.available(), reason="needs the C++ kernels")
@pytest.mark.parametrize("T,K,E", [(0, 2, 4), (1, 1, 1), (40, 4, 7), (2048, 2, 8), (1000, 4, 128)])
def test_counting_sort_equals_tensor_sort(T, K, E):
    """csrc/sort.cpp against the torch reference: same slot order (by expert, then k, then
    t), same counts, with empty slots (-1) and experts that get nothing."""
    ids = torch.randint(-1, E, (T, K), generator=torch.Generator().manual_seed(T + K + E))
    ids[ids == E // 2] = -1  # one expert with no slots
    got, want = sort_ops._sort_by_counting(ids, E), sort_ops._sort_with_tensors(ids, E)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype == torch.int64 and torch.equal(a, b)
    with pytest.raises(RuntimeError, match="num_experts"):
        sort_ops._sort_by_counting(torch.full((3, 2), E), E)


@pytest.mark.parametrize("T,K,E", [(0, 2, 4), (1, 1, 1), (9, 2, 4), (16, 3, 5), (40, 4, 7)])
def test_sort_slots_by_expert_properties(T, K, E):
    ids = torch.randint(-1, E, (T, K))
    slot_idx, counts = sort_slots_by_expert(ids, E)
    flat = ids.reshape(-1)
    assigned = flat[flat >= 0]
    assert counts.tolist() == torch.bincount(assigned, minlength=E).tolist()
    assert sorted(slot_idx.tolist()) == sorted(torch.nonzero(flat >= 0).flatten().tolist())
    experts = flat[slot_idx]
    assert experts.tolist() == sorted(experts.tolist())  # grouped by expert
    # within an expert: k-major, then token order
    key = (slot_idx % K) * max(T, 1) + slot_idx // K
    for e in range(E):
        k_e = key[experts == e]
        assert k_e.tolist() == sorted(k_e.tolist())


@pytest.mark.parametrize("shape", [(2048, 8), (5, 3, 15), (7, 1), (4, 16), (4, 65)])
def test_short_softmax_matches_torch_in_fp64(shape):
    """ops/softmax.py: output and gradient equal torch.softmax's, for rows that take the
    whole-tensor path (<= SHORT) and ones that do not (16, 65)."""
    from moekit.ops.softmax import softmax

    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 4
    if shape[-1] > 1:
        x[0, ..., 0] = float("-inf")  # a masked expert
    dy = torch.randn(*shape, generator=g, dtype=torch.float64)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = softmax(a), torch.softmax(b, dim=-1)
    from moekit.ops import softmax as softmax_ops

    assert ("ShortSoftmax" in type(ya.grad_fn).__name__) == (shape[-1] <= softmax_ops.SHORT)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(ya, yb, atol=1e-14, rtol=1e-12)
    torch.testing.assert_close(a.grad, b.grad, atol=1e-14, rtol=1e-12)
    assert (ya.sum(-1) - 1).abs().max() < 1e-12


def test_short_softmax_double_backward():
    from moekit.ops.softmax import softmax

    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(softmax, (x,))
    assert torch.autograd.gradgradcheck(softmax, (x,))

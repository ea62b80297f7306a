"""experts_impl="grouped_mm" (moe/experts/grouped_mm.py) and how a bank resolves its
implementation (moe/experts/bank.py). The registry-parametrized parity suite
(tests/test_moe_parity.py) runs grouped_mm against the loop oracle for every router,
dispatch (capacity drops included) and expert kind; here: the edge cases, and that it
reads no tensor values on the host (no sync on a GPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES
from torch.utils._python_dispatch import TorchDispatchMode

from moekit import MoEConfig, MoELayer
from moekit.moe.experts import ACTIVATIONS, ExpertBank, resolve_impl
from moekit.moe.experts.grouped_mm import grouped_mm_experts
from moekit.moe.experts.loop import loop_experts
from moekit.moe.types import DispatchPlan

SWIGLU = ACTIVATIONS.get("swiglu")


def _plan(ids_TK: torch.Tensor, weights_TK: torch.Tensor, E: int) -> DispatchPlan:
    T, K = ids_TK.shape
    flat = ids_TK.flatten()
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=E)
    return DispatchPlan(order // K, order, weights_TK.flatten()[order], counts, counts, T, top_k=K)


CASES = {
    "one token": torch.tensor([[2, 0]]),
    "all tokens to one expert": torch.tensor([[3]] * 9),
    "empty experts": torch.tensor([[0, 1], [1, 0], [0, 1], [1, 6]]),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_edge_cases_match_the_loop_oracle(case, device):
    ids = CASES[case].to(device)
    T, K = ids.shape
    E, D, F = 8, 16, 8
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(T, D, generator=g), torch.randn(E, 2 * F, D, generator=g) * 0.3,
              torch.randn(E, D, F, generator=g) * 0.3, torch.rand(T, K, generator=g)]
    results = []
    for fn in (grouped_mm_experts, loop_experts):
        x, w_in, w_out, w = (t.to(device).requires_grad_() for t in leaves)
        y = fn(x, _plan(ids, w, E), w_in, w_out, SWIGLU)
        y.backward(torch.linspace(-1, 1, y.numel(), device=device).view_as(y))
        results.append([y, x.grad, w_in.grad, w_out.grad, w.grad])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    unused = sorted(set(range(E)) - set(ids.flatten().tolist()))
    assert results[0][2][unused].abs().max() == 0  # experts without rows: zero gradient


class _HostReads(TorchDispatchMode):
    """Records ops that copy a tensor's value to the host (.item(), .tolist() of a GPU
    tensor, .cpu(): _local_scalar_dense, or a copy to another device)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__
        if "local_scalar_dense" in name or (name.startswith("_to_copy") and "device" in kwargs):
            self.reads.append(name)
        return func(*args, **kwargs)


def test_no_value_is_read_on_the_host():
    """Forward and backward run on the meta device, where tensors have shapes but no
    values: any .tolist(), .item() or .cpu() would fail (torch's meta grouped_mm takes
    bf16, the dtype it serves on GPUs). And on the CPU, no op of forward or backward
    copies a value to the host."""
    T, D, E, F, K = 10, 16, 4, 8, 2
    meta = dict(device="meta", dtype=torch.bfloat16)
    x = torch.randn(T, D, **meta, requires_grad=True)
    w_in = torch.randn(E, 2 * F, D, **meta, requires_grad=True)
    w_out = torch.randn(E, D, F, **meta, requires_grad=True)
    w = torch.rand(T * K, device="meta", requires_grad=True)
    tok, counts = torch.randint(0, T, (T * K,), device="meta"), torch.randint(0, 5, (E,), device="meta")
    y = grouped_mm_experts(x, DispatchPlan(tok, tok, w, counts, counts, T, top_k=K), w_in, w_out, SWIGLU)
    y.backward(torch.randn(T, D, **meta))
    assert x.grad.shape == x.shape and w_in.grad.shape == w_in.shape and w.grad.shape == w.shape
    ids = torch.randint(0, E, (T, K))
    leaves = [torch.randn(T, D), torch.randn(E, 2 * F, D), torch.randn(E, D, F), torch.rand(T, K)]
    x, w_in, w_out, w = (t.requires_grad_() for t in leaves)
    plan = _plan(ids, w, E)
    with _HostReads() as mode:
        grouped_mm_experts(x, plan, w_in, w_out, SWIGLU).sum().backward()
    assert mode.reads == []
    with _HostReads() as mode:  # the probe does see a host read when there is one
        plan.counts_E.sum().item()
    assert mode.reads


def test_a_bank_resolves_its_implementation_once_per_move():
    bank = ExpertBank(4, 16, 8)
    assert (bank.impl_name, bank.impl) == ("auto", "cpu")
    bank.set_impl("grouped_mm")
    assert bank.impl == "grouped_mm"
    with pytest.raises(ValueError, match="grouped_mm' takes float32, bfloat16 or float16"):
        bank.double()
    bank = ExpertBank(4, 16, 8, impl="loop").double()
    assert bank.impl == "loop"
    assert ExpertBank(4, 16, 8).bfloat16().impl == "cpu"


@pytest.mark.parametrize("name,device,dtype,shape,want", [
    ("auto", "cpu", torch.float32, (16, 8), "cpu"),
    ("auto", "cuda", torch.bfloat16, (16, 8), "grouped_mm"),
    ("auto", "cuda", torch.float64, (16, 8), "loop"),
    ("auto", "cuda", torch.float32, (16, 6), "loop"),  # rows of 24 bytes: grouped_mm cannot
    ("loop", "cuda", torch.float32, (16, 8), "loop"),
])
def test_auto_resolves_by_device_dtype_and_shape(name, device, dtype, shape, want):
    assert resolve_impl(name, torch.device(device), dtype, *shape) == want


@pytest.mark.parametrize("name,device,dtype,shape,match", [
    ("cpu", "cuda", torch.float32, (16, 8), "runs on the CPU"),
    ("grouped_mm", "cpu", torch.float64, (16, 8), "float32, bfloat16 or float16"),
    ("grouped_mm", "cpu", torch.float32, (16, 6), "d_ff=6"),
    ("fast", "cpu", torch.float32, (16, 8), "valid: auto, cpu, grouped_mm, loop"),
])
def test_an_impl_that_cannot_run_is_refused_when_built(name, device, dtype, shape, match):
    with pytest.raises(ValueError, match=match):
        resolve_impl(name, torch.device(device), dtype, *shape)


def test_loading_weights_by_assignment_resolves_again():
    layer = MoELayer(MoEConfig(d_model=16, num_experts=4, top_k=2, d_ff=8))
    sd = {k: v.double() for k, v in layer.state_dict().items()}
    layer.experts.set_impl("grouped_mm")
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        layer.load_state_dict(sd, assign=True)

"""The map between moekit state-dict names and HF checkpoint tensors.

One `Recipe` per moekit tensor says how it is made from HF tensors and back:

    copy        one HF tensor, optionally transformed  (attention, norms, router, embeddings;
                GPT-OSS experts: transposed and/or de-interleaved, see families/gpt_oss.py)
    cat         [gate; up] along dim 0                 (dense and shared FFN w_in)
    stack       E per-expert tensors stacked           (expert w_out from down_proj)
    stack_cat   E per-expert [gate; up], stacked       (expert w_in)

transformers 5 writes MoE experts per expert (`experts.{e}.gate_proj.weight`, the
layout of the original checkpoints); a folder with fused `experts.gate_up_proj`
(E, 2F, D) / `experts.down_proj` (E, D, F) is read too (`fused`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moekit.models.hf.families import HF_FAMILIES
from moekit.models.hf.families.gpt_oss import deinterleave, interleave

# transform: (HF -> moekit, moekit -> HF)
TRANSFORMS = {
    "t": (lambda t: t.transpose(1, 2), lambda t: t.transpose(1, 2)),
    "deint": (deinterleave, interleave),
    "t_deint": (lambda t: deinterleave(t).transpose(1, 2), lambda t: interleave(t.transpose(1, 2))),
}


@dataclass(frozen=True)
class Recipe:
    kind: str  # copy | cat | stack | stack_cat
    names: tuple  # HF names (nested tuples for stack_cat)
    fused: str | None = None  # HF name of the fused alternative
    transform: str | None = None  # key in TRANSFORMS (copy only)


def _layer_recipe(rest: str, pre: str, family: str, num_experts: int) -> Recipe:
    n = HF_FAMILIES.get(family).names
    moe = f"{pre}.{n.moe}"
    g, u, d = n.expert
    if rest == "attn_norm.weight":
        return Recipe("copy", (f"{pre}.input_layernorm.weight",))
    if rest == "ffn_norm.weight":
        return Recipe("copy", (f"{pre}.post_attention_layernorm.weight",))
    if rest.startswith("attn."):
        return Recipe("copy", (f"{pre}.self_attn.{rest[5:]}",))
    if rest == "ffn.w_in":  # a dense layer
        return Recipe("cat", (f"{pre}.{n.dense}.gate_proj.weight", f"{pre}.{n.dense}.up_proj.weight"))
    if rest == "ffn.w_out":
        return Recipe("copy", (f"{pre}.{n.dense}.down_proj.weight",))
    router = {"ffn.router.weight": "weight", "ffn.router.bias": "bias",
              "ffn.router.expert_bias": "e_score_correction_bias"}
    if rest in router:
        return Recipe("copy", (f"{moe}.{n.router}.{router[rest]}",))
    if n.experts_layout == "gpt_oss" and rest.startswith("ffn.experts."):
        hf_name, tf = {"w_in": ("gate_up_proj", "t_deint"), "b_in": ("gate_up_proj_bias", "deint"),
                       "w_out": ("down_proj", "t"), "b_out": ("down_proj_bias", None)}[rest[12:]]
        return Recipe("copy", (f"{moe}.experts.{hf_name}",), transform=tf)
    if n.experts_layout == "llama4" and rest in ("ffn.experts.w_in", "ffn.experts.w_out"):
        hf_name = "gate_up_proj" if rest.endswith("w_in") else "down_proj"
        return Recipe("copy", (f"{moe}.experts.{hf_name}",), transform="t")
    if rest == "ffn.experts.w_in":
        pairs = tuple((f"{moe}.experts.{e}.{g}.weight", f"{moe}.experts.{e}.{u}.weight")
                      for e in range(num_experts))
        return Recipe("stack_cat", pairs, fused=f"{moe}.experts.gate_up_proj")
    if rest == "ffn.experts.w_out":
        return Recipe("stack", tuple(f"{moe}.experts.{e}.{d}.weight" for e in range(num_experts)),
                      fused=f"{moe}.experts.down_proj")
    if rest == "ffn.shared.ffn.w_in" and n.shared:
        return Recipe("cat", (f"{moe}.{n.shared}.gate_proj.weight", f"{moe}.{n.shared}.up_proj.weight"))
    if rest == "ffn.shared.ffn.w_out" and n.shared:
        return Recipe("copy", (f"{moe}.{n.shared}.down_proj.weight",))
    if rest == "ffn.shared.gate.weight" and n.shared_gate:
        return Recipe("copy", (f"{moe}.{n.shared_gate}.weight",))
    raise KeyError(rest)


def recipe(name: str, family: str, num_experts: int) -> Recipe:
    """The recipe of one moekit state-dict entry."""
    top = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "head.weight": "lm_head.weight"}
    if name in top:
        return Recipe("copy", (top[name],))
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    try:
        if m is None:
            raise KeyError(name)
        return _layer_recipe(m.group(2), f"model.layers.{m.group(1)}", family, num_experts)
    except KeyError:
        raise ValueError(f"no HF name for moekit tensor {name!r} (family {family})") from None


def assemble(r: Recipe, get) -> torch.Tensor:
    """Build a moekit tensor from HF tensors; `get(name)` reads one."""
    if r.kind == "copy":
        t = get(r.names[0])
        return TRANSFORMS[r.transform][0](t) if r.transform else t
    if r.kind == "cat":
        return torch.cat([get(n) for n in r.names], dim=0)
    if r.kind == "stack":
        return torch.stack([get(n) for n in r.names])
    return torch.stack([torch.cat([get(g), get(u)], dim=0) for g, u in r.names])


def pieces(r: Recipe, out: torch.Tensor, fused: bool = False) -> list[tuple[str, torch.Tensor, Callable]]:
    """`assemble` as writes into a preallocated `out`: (HF name, view of out, src -> view of
    src) per piece, so the loader copies each piece straight from the file into place
    (no stacked or converted temporary). `assemble` is the reference
    (tests/test_hf_families.py checks both give the same tensors)."""
    if fused:
        return [(r.fused, out, _same)]
    if r.kind == "copy":
        return _copy_pieces(r.names[0], r.transform, out)
    if r.kind == "cat":
        half = out.shape[0] // 2
        return [(r.names[0], out[:half], _same), (r.names[1], out[half:], _same)]
    if r.kind == "stack":
        return [(n, out[e], _same) for e, n in enumerate(r.names)]
    half = out.shape[1] // 2
    return [p for e, (g, u) in enumerate(r.names)
            for p in ((g, out[e, :half], _same), (u, out[e, half:], _same))]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _copy_pieces(name: str, transform: str | None, out: torch.Tensor) -> list:
    """TRANSFORMS[...][0] as views: the interleaved gate/up columns land in out's halves."""
    if transform is None:
        return [(name, out, _same)]
    if transform == "t":
        return [(name, out, lambda s: s.transpose(1, 2))]
    if transform == "deint":  # out (..., 2F) = [s[..., 0::2] | s[..., 1::2]]
        half = out.shape[-1] // 2
        return [(name, out[..., :half], lambda s: s[..., 0::2]),
                (name, out[..., half:], lambda s: s[..., 1::2])]
    half = out.shape[1] // 2  # t_deint: out (E, 2F, D) from s (E, D, 2F)
    return [(name, out[:, :half], lambda s: s[..., 0::2].transpose(1, 2)),
            (name, out[:, half:], lambda s: s[..., 1::2].transpose(1, 2))]


def split(r: Recipe, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inverse of `assemble`: HF name -> tensor (contiguous, ready for safetensors)."""
    if r.kind == "copy":
        return {r.names[0]: (TRANSFORMS[r.transform][1](t) if r.transform else t).contiguous()}
    if r.kind == "cat":
        return dict(zip(r.names, (p.contiguous() for p in t.chunk(2, dim=0)), strict=True))
    if r.kind == "stack":
        return {n: t[e].contiguous() for e, n in enumerate(r.names)}
    out = {}
    for e, (g, u) in enumerate(r.names):
        gate, up = t[e].chunk(2, dim=0)
        out[g], out[u] = gate.contiguous(), up.contiguous()
    return out

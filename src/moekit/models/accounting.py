"""Parameter accounting from a config alone: total, active per token, memory, FLOPs.

No weights are read and no model is built: every family file in
`models/hf/families/` counts its modules analytically (weights, biases, norms,
sinks) the way the reference implementation lays them out, so the numbers equal
`sum(p.numel() for p in model.parameters())` of transformers' model (buffers such
as DeepSeek-V3's `e_score_correction_bias` are not parameters and are not counted).

Conventions (stated once, printed by `moekit inspect`):
  total            every parameter of the published model (tied matrices once).
  active           parameters a single token touches: routed experts count top_k of
                   num_experts, everything else counts fully, including the whole
                   input-embedding matrix (the convention of the Mixtral/Qwen/DBRX
                   announcements).
  active_no_embed  active minus the input embedding (DeepSeek and gpt-oss publish
                   this one: the unembedding is counted, the embedding is not). With
                   tied embeddings the matrix is still used as the unembedding, so
                   nothing is subtracted.
  FLOPs per token  2 x the active *matmul* parameters (the embedding lookup, norms,
                   biases and sinks are not matmuls) + attention scores and values
                   at a stated context length L: per layer 2*H*(d_qk + d_v)*L_eff,
                   L_eff = min(L, sliding window) -- the FLOPs of the L-th token
                   (Kaplan et al. 2020, Sec. 2.1, with the context term kept).
  memory           weights only (no KV cache, no activations, no quantisation
                   scales): total x 2 bytes (bf16), x 1 (fp8), x 0.5 (int4).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

BYTES_PER_PARAM = {"bf16": 2.0, "fp8": 1.0, "int4": 0.5}


@dataclass(frozen=True)
class Part:
    """One group of parameters: `params` in total, `active` of them per token;
    `matmul` says whether its active params are multiplied with the token (FLOPs)."""

    name: str
    params: int
    active: int
    matmul: bool = True


@dataclass(frozen=True)
class AttnLayer:
    """What one attention layer costs per token beyond its projections."""

    heads: int
    d_qk: int
    d_v: int
    window: int | None = None  # sliding window (None: full causal)


@dataclass
class Tally:
    """Accumulates parts by name while a family walks its layers."""

    parts: dict[str, Part] = field(default_factory=dict)
    attn: list[AttnLayer] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, int] = field(default_factory=dict)
    num_experts: int = 0
    top_k: int = 0
    tied: bool = False
    tied_head_matmul: int = 0  # a tied unembedding: multiplied per token, counted once

    def add(self, name: str, params: int, active: int | None = None, matmul: bool = True) -> None:
        active = params if active is None else active
        old = self.parts.get(name, Part(name, 0, 0, matmul))
        self.parts[name] = Part(name, old.params + params, old.active + active, matmul)

    def experts(self, name: str, num: int, k: int, per_expert: int) -> None:
        """`num` experts of `per_expert` params each, `k` of them used per token."""
        self.add(name, num * per_expert, k * per_expert)


@dataclass(frozen=True)
class ParamReport:
    model_type: str
    family: str
    total: int
    active: int
    active_no_embed: int
    routed_expert_params: int
    shared_expert_params: int
    non_expert_params: int
    input_embedding: int
    num_experts: int
    top_k: int
    tied_embeddings: bool
    memory_gb: dict[str, float]
    context_len: int
    flops_per_token: int
    matmul_flops_per_token: int
    attention_flops_per_token: int
    parts: list[Part]
    extra: dict[str, int]
    notes: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def _attention_flops(layers: list[AttnLayer], context_len: int) -> int:
    """QK^T and AV of the token at position `context_len` (multiply-add = 2 FLOPs)."""
    total = 0
    for a in layers:
        seen = context_len if a.window is None else min(context_len, a.window)
        total += 2 * a.heads * (a.d_qk + a.d_v) * seen
    return total


def build_report(model_type: str, family: str, t: Tally, context_len: int) -> ParamReport:
    parts = list(t.parts.values())
    total = sum(p.params for p in parts)
    active = sum(p.active for p in parts)
    emb = t.parts["embedding"].params if "embedding" in t.parts else 0
    matmul = 2 * (sum(p.active for p in parts if p.matmul) + t.tied_head_matmul)
    attn = _attention_flops(t.attn, context_len)
    if "mtp_params_not_in_total" in t.extra:
        t.extra["total_with_mtp"] = total + t.extra["mtp_params_not_in_total"]
    routed = sum(p.params for p in parts if p.name.startswith("routed"))
    shared = sum(p.params for p in parts if p.name.startswith("shared"))
    return ParamReport(
        model_type=model_type, family=family, total=total, active=active,
        active_no_embed=active if t.tied else active - emb,
        routed_expert_params=routed, shared_expert_params=shared,
        non_expert_params=total - routed - shared, input_embedding=emb,
        num_experts=t.num_experts, top_k=t.top_k, tied_embeddings=t.tied,
        memory_gb={k: total * b / 1e9 for k, b in BYTES_PER_PARAM.items()},
        context_len=context_len, flops_per_token=matmul + attn,
        matmul_flops_per_token=matmul, attention_flops_per_token=attn,
        parts=parts, extra=dict(t.extra), notes=list(t.notes),
    )


def load_config(path: str | Path) -> dict:
    """Read `config.json` from a file or a checkpoint folder."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON: {e}") from None


def count_parameters(config: dict, context_len: int = 4096) -> ParamReport:
    """Count a model's parameters from its HF `config.json` dict (or a vendor
    config we recognise, e.g. Grok-1's). Unknown model types raise ValueError
    listing the supported ones."""
    from moekit.models.hf.families import family_of

    if context_len < 1:
        raise ValueError(f"context_len={context_len} is not allowed; need >= 1")
    model_type, family = family_of(config)
    return build_report(model_type, family.name, family.count(config), context_len)


def supported_model_types() -> list[str]:
    from moekit.models.hf.families import HF_FAMILIES

    return HF_FAMILIES.names()


def format_report(r: ParamReport) -> str:
    """A human-readable table for `moekit inspect`."""
    b = 1e9
    lines = [
        f"model_type        {r.model_type}  (family: {r.family})",
        f"total params      {r.total:,}  ({r.total / b:.2f}B)",
        f"active / token    {r.active:,}  ({r.active / b:.2f}B, incl. input embedding)",
        f"active no embed   {r.active_no_embed:,}  ({r.active_no_embed / b:.2f}B)",
        f"routed experts    {r.routed_expert_params:,}  ({r.num_experts} experts, top-{r.top_k})",
        f"shared experts    {r.shared_expert_params:,}",
        f"non-expert        {r.non_expert_params:,}",
        f"input embedding   {r.input_embedding:,}  (tied: {r.tied_embeddings})",
        "memory (weights)  " + ", ".join(f"{k} {v:.1f} GB" for k, v in r.memory_gb.items()),
        f"FLOPs / token     {r.flops_per_token / b:.2f} GFLOP at context {r.context_len} "
        f"(matmul {r.matmul_flops_per_token / b:.2f} + attention "
        f"{r.attention_flops_per_token / b:.2f})",
        "parts:",
    ]
    for p in r.parts:
        lines.append(f"  {p.name:<18}{p.params:>18,}  active {p.active:>18,}")
    for k, v in r.extra.items():
        lines.append(f"extra {k}: {v:,} ({v / b:.2f}B)")
    lines += [f"note: {n}" for n in r.notes]
    return "\n".join(lines)

"""What the family files share: the registry, reading config.json, the common fields.

A family file (one per transformers model family) holds all moekit knows about it:
DEFAULTS (transformers' defaults of the optional fields it reads), config.json ->
HFLMConfig, where its weights live (`Names`), its parameter counter and, where
transformers has an MoE block moekit maps one to one, the block interop. It registers
one `Family` per config.json `model_type` in HF_FAMILIES.

Every feature a checkpoint switches on must be either supported or refused with a
ValueError naming the field: a silently ignored field would load a model that computes
something else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import moekit.models.attention_mla  # noqa: F401  (registers attention "mla")
import moekit.models.hf.attention  # noqa: F401  (registers attention "hf_gqa")
from moekit.models.accounting import Tally
from moekit.models.hf.config import HFLMConfig
from moekit.moe.config import MoEConfig
from moekit.registry import Registry


@dataclass(frozen=True)
class Names:
    """Where a family keeps its FFN weights (under model.layers.{i}.)."""

    moe: str = "mlp"  # the sparse block
    expert: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    shared: str | None = None  # shared-expert module name
    shared_gate: str | None = None
    router: str = "gate"
    # "per_expert" | "gpt_oss" (fused, transposed, interleaved, biased) | "llama4" (fused, transposed)
    experts_layout: str = "per_expert"
    dense: str = "mlp"  # the dense FFN of non-MoE layers


@dataclass(frozen=True)
class Family:
    """One config.json model_type: how to count it and (if moekit loads it) build it."""

    name: str  # the family file; several model_types may share one
    count: Callable[[dict], Tally]  # config.json -> parameter tally (models/accounting.py)
    build: Callable[..., HFLMConfig] | None = None  # (config.json, max_seq_len) -> HFLMConfig
    names: Names = field(default_factory=Names)
    # transformers' defaults of the optional fields build and count read (checked against
    # transformers' config classes in tests/test_hf_defaults.py)
    defaults: dict = field(default_factory=dict)


HF_FAMILIES: Registry[Family] = Registry("HF model_type")


def with_defaults(hf: dict, defaults: dict) -> dict:
    """config.json with transformers' default for every absent field, as transformers'
    config class fills them in. An explicit null stays null (transformers passes it on
    too); legacy rope fields (rope_theta, rope_scaling) keep the default
    rope_parameters out."""
    out = {**defaults, **hf}
    if "rope_parameters" not in hf and ("rope_theta" in hf or "rope_scaling" in hf):
        out.pop("rope_parameters", None)
    return out


def get(hf: dict, key: str, default=None, *, required: bool = False):
    """hf[key]; `default` stands in for null. A required field that is absent or null
    is a ValueError naming it."""
    if required and hf.get(key) is None:
        raise ValueError(f"config.json: field {key!r} is missing (model_type {hf.get('model_type')!r})")
    v = hf.get(key, default)
    return default if v is None else v


def refuse(hf: dict, key: str, ok: Callable, why: str) -> None:
    if key in hf and hf[key] is not None and not ok(hf[key]):
        raise ValueError(f"config.json: {key}={hf[key]!r} is not supported: {why}")


def rope_params(hf: dict) -> tuple[float, dict]:
    """(theta, params) from transformers 5 `rope_parameters` or legacy rope_theta/rope_scaling."""
    p = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = p.get("rope_theta", hf.get("rope_theta", 10000.0))
    p["rope_type"] = p.get("rope_type", p.get("type", "default"))
    if p["rope_type"] not in ("default", "yarn", "llama3"):
        raise ValueError(f"config.json: rope type {p['rope_type']!r} is not supported; "
                         "valid: default, yarn, llama3")
    if p["rope_type"] in ("yarn", "llama3"):
        p.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return float(theta), p


# HF hidden_act of a gated FFN -> moekit activation name (act(gate) * up)
GATED_KIND = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}


def ffn_kind(hf: dict) -> str:
    act = get(hf, "hidden_act", "silu")
    if act not in GATED_KIND:
        raise ValueError(f"config.json: hidden_act={act!r} is not supported; valid: {sorted(GATED_KIND)}")
    return GATED_KIND[act]


def base_fields(hf: dict, max_seq_len: int | None, window: bool = False, **kw) -> dict:
    """LMConfig fields every decoder family shares. window: the family's attention
    honours `sliding_window` (else a window shorter than max_seq_len is refused)."""
    theta, rope = rope_params(hf)
    refuse(hf, "quantization_config", lambda v: False,
           "quantized checkpoints (fp8 blocks, mxfp4) are not loaded; dequantize to bf16 first")
    max_seq_len = max_seq_len or min(get(hf, "max_position_embeddings", required=True), 32768)
    refuse(hf, "sliding_window", lambda v: window or not hf.get("use_sliding_window", True) or
           v >= max_seq_len, "sliding-window attention is not implemented for this family")
    n_heads, d_model = get(hf, "num_attention_heads", required=True), get(hf, "hidden_size", required=True)
    fields = dict(
        vocab_size=get(hf, "vocab_size", required=True), d_model=d_model,
        n_layers=get(hf, "num_hidden_layers", required=True), n_heads=n_heads,
        n_kv_heads=get(hf, "num_key_value_heads", n_heads), head_dim=get(hf, "head_dim", d_model // n_heads),
        max_seq_len=max_seq_len, rope_theta=theta, rope=rope,
        norm_eps=get(hf, "rms_norm_eps", required=True),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), attention="hf_gqa",
        dense_d_ff=get(hf, "intermediate_size", required=True), ffn_kind=ffn_kind(hf),
        hf_config=dict(hf))
    return {**fields, **kw}


def layer_windows(hf: dict) -> tuple[int | None, tuple[str, ...] | None]:
    """(sliding_window, layer_types) of the Qwen2/Qwen3 families: the window applies only
    with use_sliding_window, on the layers layer_types marks (by default, as transformers
    sets it, the layers from max_window_layers on)."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    if window is None:
        return None, None
    n = get(hf, "num_hidden_layers", required=True)
    first = get(hf, "max_window_layers", 0)
    types = hf.get("layer_types") or ["sliding_attention" if i >= first else "full_attention"
                                      for i in range(n)]
    return window, tuple(types)


def aux_loss_coef(hf: dict) -> float:
    """transformers adds the Switch balance loss only when output_router_logits is set."""
    return float(get(hf, "router_aux_loss_coef", 0.0)) if hf.get("output_router_logits") else 0.0


def moe_config(hf: dict, experts_key: str, d_ff: int, /, **kw) -> MoEConfig:
    """The MoEConfig of one sparse block: shapes, expert kind, balance loss; routing and
    overrides of any field in kw."""
    # transformers 5 writes some families' expert count as num_local_experts
    num = hf.get(experts_key) if hf.get(experts_key) is not None else hf.get("num_local_experts")
    fields = dict(d_model=get(hf, "hidden_size", required=True),
                  num_experts=num if num is not None else get(hf, experts_key, required=True),
                  top_k=get(hf, "num_experts_per_tok", required=True), d_ff=d_ff,
                  expert=ffn_kind(hf), aux_loss_coef=aux_loss_coef(hf))
    return MoEConfig(**{**fields, **kw})


def as_dict(hf_config) -> dict:
    """A config.json dict, or a transformers config object as one."""
    if isinstance(hf_config, dict):
        return hf_config
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    return dict(vars(hf_config))

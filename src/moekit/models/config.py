"""LMConfig: the shape of a decoder-only language model, validated when it is built.

Which layers are MoE: layer i (0-based) has an MoE FFN when `moe` is set, `moe_every`
> 0, i >= first_k_dense and (i + 1) % moe_every == 0 — DeepSeek's
`first_k_dense_replace` plus Qwen2-MoE's `decoder_sparse_step` (moe_every=2 gives
GShard's "every other layer", starting at the second). All other layers use a dense
FFN of width dense_d_ff.

Variants are named (attention, norm, ffn_kind) and looked up in registries, so a new
kind is a file plus a line in a table; an unknown name is rejected here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any

from moekit.moe.config import MoEConfig
from moekit.validation import invalid, is_int, is_num, reject_unknown_fields

_bad = partial(invalid, "LMConfig")
_is_int, _is_num = is_int, is_num


@dataclass(frozen=True)
class LMConfig:
    # --- token embedding and head
    vocab_size: int = 256
    d_model: int = 128
    tie_embeddings: bool = True  # head.weight is the embedding matrix (Press & Wolf 2017)

    # --- attention
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4  # < n_heads: grouped-query attention (Ainslie et al. 2023)
    head_dim: int | None = None  # None: d_model // n_heads
    max_seq_len: int = 256
    rope_theta: float = 10000.0  # RoPE base (Su et al. 2021); Mixtral uses 1e6
    attention: str = "gqa"  # name in moekit.models.attention.ATTENTIONS

    # --- norm
    norm: str = "rmsnorm"  # name in moekit.models.norm.NORMS
    norm_eps: float = 1e-5

    # --- feed-forward per layer
    dense_d_ff: int = 512  # width of the dense FFN layers
    ffn_kind: str = "swiglu"  # activation of the dense FFN layers (MoE layers use moe.expert)
    first_k_dense: int = 0  # the first k layers are dense (DeepSeek-V3 keeps 3)
    moe_every: int = 1  # MoE in every n-th layer; 0 = all dense
    moe: MoEConfig | None = None  # None = all dense

    # --- training
    dropout: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for check in (_check_shapes, _check_attention, _check_ffn, _check_misc):
            check(self)

    # ---- derived
    @property
    def head_size(self) -> int:
        """The resolved head_dim."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        return (self.moe is not None and self.moe_every > 0 and i >= self.first_k_dense
                and (i + 1) % self.moe_every == 0)

    @property
    def moe_layer_ids(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]

    # ---- copies and serialisation
    def replace(self, **changes: Any) -> LMConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able; moe is nested as a dict (or None)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LMConfig:
        reject_unknown_fields(cls, d)
        d = dict(d)
        if isinstance(d.get("moe"), dict):
            d["moe"] = MoEConfig.from_dict(d["moe"])
        return cls(**d)


def _positive_int(cfg: LMConfig, name: str) -> None:
    v = getattr(cfg, name)
    if not _is_int(v) or v <= 0:
        raise _bad(name, v, "must be a positive integer")


def _check_shapes(cfg: LMConfig) -> None:
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "max_seq_len",
                 "dense_d_ff"):
        _positive_int(cfg, name)
    if cfg.head_dim is None and cfg.d_model % cfg.n_heads:
        raise _bad("n_heads", cfg.n_heads,
                   f"must divide d_model={cfg.d_model} when head_dim is None")
    if cfg.head_dim is not None and (not _is_int(cfg.head_dim) or cfg.head_dim <= 0):
        raise _bad("head_dim", cfg.head_dim, "must be a positive integer or None (= d_model // n_heads)")
    if cfg.head_size % 2:
        raise _bad("head_dim", cfg.head_size, "must be even (RoPE rotates pairs of channels)")


def _check_attention(cfg: LMConfig) -> None:
    from moekit.models.attention import ATTENTIONS

    if cfg.n_kv_heads > cfg.n_heads or cfg.n_heads % cfg.n_kv_heads:
        raise _bad("n_kv_heads", cfg.n_kv_heads, f"must divide n_heads={cfg.n_heads}")
    if not _is_num(cfg.rope_theta) or cfg.rope_theta <= 0:
        raise _bad("rope_theta", cfg.rope_theta, "must be a finite number > 0")
    if cfg.attention not in ATTENTIONS:
        raise _bad("attention", cfg.attention, f"valid: {', '.join(ATTENTIONS.names())}")


def _check_ffn(cfg: LMConfig) -> None:
    from moekit.moe.experts import ACTIVATIONS

    if cfg.ffn_kind not in ACTIVATIONS:
        raise _bad("ffn_kind", cfg.ffn_kind, f"valid: {', '.join(ACTIVATIONS.names())}")
    if not _is_int(cfg.first_k_dense) or not 0 <= cfg.first_k_dense <= cfg.n_layers:
        raise _bad("first_k_dense", cfg.first_k_dense, f"must be an integer in [0, n_layers={cfg.n_layers}]")
    if not _is_int(cfg.moe_every) or cfg.moe_every < 0:
        raise _bad("moe_every", cfg.moe_every, "must be an integer >= 0 (0 = all dense)")
    if cfg.moe is not None and not isinstance(cfg.moe, MoEConfig):
        raise _bad("moe", cfg.moe, "must be a MoEConfig or None")
    if cfg.moe is not None and cfg.moe.d_model != cfg.d_model:
        raise _bad("moe", f"MoEConfig(d_model={cfg.moe.d_model}, ...)",
                   f"moe.d_model must equal d_model={cfg.d_model}")


def _check_misc(cfg: LMConfig) -> None:
    from moekit.models.norm import NORMS

    if cfg.norm not in NORMS:
        raise _bad("norm", cfg.norm, f"valid: {', '.join(NORMS.names())}")
    if not _is_num(cfg.norm_eps) or cfg.norm_eps <= 0:
        raise _bad("norm_eps", cfg.norm_eps, "must be a finite number > 0")
    if not isinstance(cfg.tie_embeddings, bool):
        raise _bad("tie_embeddings", cfg.tie_embeddings, "must be True or False")
    if not _is_num(cfg.dropout) or not 0.0 <= cfg.dropout < 1.0:
        raise _bad("dropout", cfg.dropout, "must be in [0, 1)")
    if not _is_num(cfg.init_std) or cfg.init_std <= 0:
        raise _bad("init_std", cfg.init_std, "must be a finite number > 0")

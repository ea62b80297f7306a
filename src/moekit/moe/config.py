"""MoEConfig: every knob of one MoE layer, validated when it is built.

Variants are chosen by name (router, dispatch, expert, experts_impl) from the
registries in `moe/router`, `moe/dispatch` and `moe/experts`; an unknown name is
rejected here with the list of valid ones, never deep inside forward.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from moekit.validation import invalid, is_int, is_num, reject_unknown_fields

_bad = partial(invalid, "MoEConfig")
_is_int, _is_num = is_int, is_num


@dataclass(frozen=True)
class MoEConfig:
    # --- shapes
    d_model: int = 256
    num_experts: int = 8
    top_k: int = 2
    d_ff: int = 512  # hidden width of one routed expert (F)

    # --- 1 route
    router: str = "topk_softmax"
    # topk_softmax: softmax over all experts then top-k ("before", Switch/GShard/Mixtral),
    # or top-k of the logits then softmax over the k ("after", GPT-OSS).
    softmax_order: str = "before"
    normalize_topk: bool = True  # renormalise the k weights to sum to 1 (Mixtral; not Qwen2-MoE)
    jitter_eps: float = 0.0  # Switch (Fedus et al. 2021 §2.4): x *= U(1-eps, 1+eps) in training
    router_bias: bool = False  # a bias on the router projection (GPT-OSS)
    n_group: int = 1  # topk_sigmoid: DeepSeek-V3 group-limited routing
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    noise_eps: float = 1e-2  # noisy_topk: floor of the learned noise std (Shazeer 2017)
    router_options: dict[str, Any] = field(default_factory=dict)  # variant-specific extras

    # --- 2 dispatch
    dispatch: str = "dropless"
    capacity_factor: float = 1.25  # capacity = ceil(CF * T * K / E) (GShard §2.2)
    drop_policy: str = "position"  # "position" (earlier slots first) or "probability"
    # training only: each routed slot is dropped with this probability and the token's
    # remaining weights are rescaled to the same sum (moe/router/expert_dropout.py)
    expert_dropout: float = 0.0

    # --- 3 experts
    expert: str = "swiglu"
    # how the experts compute (moe/experts/bank.py): "auto" (the CPU wing on the CPU,
    # grouped_mm elsewhere), "cpu", "grouped_mm", or "loop" (the reference oracle)
    experts_impl: str = "auto"
    num_shared_experts: int = 0
    shared_d_ff: int | None = None  # width of each shared expert; default d_ff
    shared_gate: bool = False  # Qwen2-MoE: sigmoid(x·w) scales the shared expert's output
    init_std: float = 0.02
    # PR-MoE residual (DeepSpeed-MoE, Rajbhandari et al. 2022 §4.1): a dense FFN of this width on every token,
    # mixed with the routed output by a learned per-token 2-way softmax; None = off
    residual_d_ff: int | None = None

    # --- balance (each loss has its own coefficient; aux_loss is their weighted sum)
    aux_loss_coef: float = 0.0  # Switch/GShard f·P
    cv2_loss_coef: float = 0.0  # Shazeer 2017 importance + load CV²
    z_loss_coef: float = 0.0  # ST-MoE router z-loss
    seq_aux_loss_coef: float = 0.0  # DeepSeek-V3 sequence-wise balance loss
    bias_update_rate: float = 1e-3  # DeepSeek-V3 aux-loss-free bias step γ
    entropy_loss_coef: float = 0.0  # DSelect-k selector entropy (Hazimeh et al. 2021 eq. 9)

    def __post_init__(self) -> None:
        for check in (_check_shapes, _check_router, _check_dispatch, _check_experts, _check_coefs):
            check(self)

    def replace(self, **changes: Any) -> MoEConfig:
        return dataclasses.replace(self, **changes)

    @property
    def capacity_per_token_slot(self) -> float:
        return self.capacity_factor * self.top_k / self.num_experts

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MoEConfig:
        d = dict(d)
        if "expert_backend" in d and "experts_impl" not in d:  # run folders written before experts_impl
            old = d.pop("expert_backend")
            d["experts_impl"] = {"grouped": "auto"}.get(old, old)
        reject_unknown_fields(cls, d)
        return cls(**d)


def _positive_int(cfg: MoEConfig, name: str) -> None:
    v = getattr(cfg, name)
    if not _is_int(v) or v <= 0:
        raise _bad(name, v, "must be a positive integer")


def _check_shapes(cfg: MoEConfig) -> None:
    for name in ("d_model", "num_experts", "d_ff"):
        _positive_int(cfg, name)
    if not _is_int(cfg.top_k) or cfg.top_k <= 0:
        raise _bad("top_k", cfg.top_k, "must be a positive integer")
    if cfg.top_k > cfg.num_experts:
        raise _bad("top_k", cfg.top_k, f"must be <= num_experts ({cfg.num_experts})")


def _check_router(cfg: MoEConfig) -> None:
    from moekit.moe.router import ROUTERS

    if cfg.router not in ROUTERS:
        raise _bad("router", cfg.router, f"valid: {', '.join(ROUTERS.names())}")
    if cfg.softmax_order not in ("before", "after"):
        raise _bad("softmax_order", cfg.softmax_order, "valid: 'before', 'after'")
    for name in ("normalize_topk", "router_bias", "shared_gate"):
        if not isinstance(getattr(cfg, name), bool):
            raise _bad(name, getattr(cfg, name), "must be True or False")
    if not _is_num(cfg.jitter_eps) or not 0.0 <= cfg.jitter_eps < 1.0:
        raise _bad("jitter_eps", cfg.jitter_eps, "must be in [0, 1)")
    if not _is_int(cfg.n_group) or cfg.n_group <= 0 or cfg.num_experts % cfg.n_group:
        raise _bad("n_group", cfg.n_group, f"must be a positive divisor of num_experts ({cfg.num_experts})")
    if not _is_int(cfg.topk_group) or not 1 <= cfg.topk_group <= cfg.n_group:
        raise _bad("topk_group", cfg.topk_group, f"must be in [1, n_group={cfg.n_group}]")
    if cfg.n_group > 1 and cfg.top_k > cfg.topk_group * (cfg.num_experts // cfg.n_group):
        raise _bad(
            "top_k", cfg.top_k,
            f"must be <= topk_group * experts per group ({cfg.topk_group * (cfg.num_experts // cfg.n_group)})",
        )
    if cfg.n_group > 1 and cfg.num_experts // cfg.n_group < 2:
        raise _bad("n_group", cfg.n_group, "each group needs at least 2 experts (group score = top-2 sum)")
    if not _is_num(cfg.routed_scaling_factor) or cfg.routed_scaling_factor <= 0:
        raise _bad("routed_scaling_factor", cfg.routed_scaling_factor, "must be a finite number > 0")
    if not _is_num(cfg.noise_eps) or cfg.noise_eps < 0:
        raise _bad("noise_eps", cfg.noise_eps, "must be a finite number >= 0")
    if not isinstance(cfg.router_options, dict):
        raise _bad("router_options", cfg.router_options, "must be a dict")
    router_cls = ROUTERS.get(cfg.router)
    router_cls.check_config(cfg)
    # options a router would silently ignore are errors: a typo must not train another model
    for name, attr, default in (("n_group", "uses_groups", 1), ("jitter_eps", "uses_jitter", 0.0)):
        if getattr(cfg, name) != default and not getattr(router_cls, attr, False):
            users = [n for n in ROUTERS.names() if getattr(ROUTERS.get(n), attr, False)]
            raise _bad(name, getattr(cfg, name),
                       f"router {cfg.router!r} does not use it (leave it at {default}); routers that do: {', '.join(users)}")


def _check_dispatch(cfg: MoEConfig) -> None:
    from moekit.moe.dispatch import DISPATCHERS

    if cfg.dispatch not in DISPATCHERS:
        raise _bad("dispatch", cfg.dispatch, f"valid: {', '.join(DISPATCHERS.names())}")
    if not _is_num(cfg.capacity_factor) or cfg.capacity_factor <= 0:
        raise _bad("capacity_factor", cfg.capacity_factor, "must be a finite number > 0")
    if cfg.drop_policy not in ("position", "probability"):
        raise _bad("drop_policy", cfg.drop_policy, "valid: 'position', 'probability'")
    if not _is_num(cfg.expert_dropout) or not 0.0 <= cfg.expert_dropout < 1.0:
        raise _bad("expert_dropout", cfg.expert_dropout, "must be in [0, 1)")


def _check_experts(cfg: MoEConfig) -> None:
    from moekit.moe.experts import ACTIVATIONS, IMPL_NAMES

    if cfg.expert not in ACTIVATIONS:
        raise _bad("expert", cfg.expert, f"valid: {', '.join(ACTIVATIONS.names())}")
    if cfg.experts_impl not in IMPL_NAMES:
        raise _bad("experts_impl", cfg.experts_impl, f"valid: {', '.join(IMPL_NAMES)}")
    if not _is_int(cfg.num_shared_experts) or cfg.num_shared_experts < 0:
        raise _bad("num_shared_experts", cfg.num_shared_experts, "must be an integer >= 0")
    if cfg.shared_d_ff is not None and (not _is_int(cfg.shared_d_ff) or cfg.shared_d_ff <= 0):
        raise _bad("shared_d_ff", cfg.shared_d_ff, "must be a positive integer or None (= d_ff)")
    if cfg.shared_d_ff is not None and cfg.num_shared_experts == 0:
        raise _bad("shared_d_ff", cfg.shared_d_ff, "needs num_shared_experts >= 1 (or leave it None)")
    if cfg.shared_gate and cfg.num_shared_experts == 0:
        raise _bad("shared_gate", cfg.shared_gate, "needs num_shared_experts >= 1")
    if cfg.residual_d_ff is not None and (not _is_int(cfg.residual_d_ff) or cfg.residual_d_ff <= 0):
        raise _bad("residual_d_ff", cfg.residual_d_ff, "must be a positive integer or None (no residual FFN)")
    if not _is_num(cfg.init_std) or cfg.init_std <= 0:
        raise _bad("init_std", cfg.init_std, "must be a finite number > 0")


def _check_coefs(cfg: MoEConfig) -> None:
    for name in ("aux_loss_coef", "cv2_loss_coef", "z_loss_coef", "seq_aux_loss_coef", "bias_update_rate",
                 "entropy_loss_coef"):
        v = getattr(cfg, name)
        if not _is_num(v) or v < 0:
            raise _bad(name, v, "must be a finite number >= 0")
    from moekit.moe.router import ROUTERS

    if cfg.entropy_loss_coef > 0 and "entropy" not in getattr(ROUTERS.get(cfg.router), "extra_losses", ()):
        raise _bad("entropy_loss_coef", cfg.entropy_loss_coef, "must be 0 unless router='dselect_k'")

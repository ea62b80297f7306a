"""MoEConfig validation: a bad value is rejected when the config is built, with a
ValueError that names the field and the value (and what is allowed)."""

from __future__ import annotations

import re

import pytest

from moekit import MoEConfig
from moekit.moe.dispatch import DISPATCHERS
from moekit.moe.experts import ACTIVATIONS, EXPERTS_IMPLS
from moekit.moe.router import ROUTERS

NAN, INF = float("nan"), float("inf")

# (overrides on top of d_model=16, num_experts=8, top_k=2; the field the error must name; its value)
BAD = [
    (dict(top_k=9), "top_k", 9),
    (dict(top_k=0), "top_k", 0),
    (dict(top_k=-1), "top_k", -1),
    (dict(top_k=True), "top_k", True),
    (dict(top_k=2.0), "top_k", 2.0),
    (dict(num_experts=0), "num_experts", 0),
    (dict(num_experts=True), "num_experts", True),
    (dict(num_experts=2.5), "num_experts", 2.5),
    (dict(d_model=0), "d_model", 0),
    (dict(d_model=8.0), "d_model", 8.0),
    (dict(d_ff=-3), "d_ff", -3),
    (dict(d_ff=None), "d_ff", None),
    (dict(capacity_factor=0.0), "capacity_factor", 0.0),
    (dict(capacity_factor=-1.25), "capacity_factor", -1.25),
    (dict(capacity_factor=NAN), "capacity_factor", NAN),
    (dict(capacity_factor=INF), "capacity_factor", INF),
    (dict(capacity_factor=True), "capacity_factor", True),
    (dict(router="nope"), "router", "nope"),
    (dict(router=None), "router", None),
    (dict(router=["topk_softmax"]), "router", ["topk_softmax"]),
    (dict(dispatch="dropfull"), "dispatch", "dropfull"),
    (dict(expert="swish"), "expert", "swish"),
    (dict(experts_impl="cuda"), "experts_impl", "cuda"),
    (dict(softmax_order="middle"), "softmax_order", "middle"),
    (dict(drop_policy="random"), "drop_policy", "random"),
    (dict(aux_loss_coef=-0.1), "aux_loss_coef", -0.1),
    (dict(cv2_loss_coef=-1), "cv2_loss_coef", -1),
    (dict(z_loss_coef=NAN), "z_loss_coef", NAN),
    (dict(seq_aux_loss_coef=INF), "seq_aux_loss_coef", INF),
    (dict(aux_loss_coef=True), "aux_loss_coef", True),
    (dict(bias_update_rate=-1e-3), "bias_update_rate", -1e-3),
    (dict(router="topk_sigmoid", n_group=3), "n_group", 3),
    (dict(router="topk_sigmoid", n_group=0), "n_group", 0),
    (dict(router="topk_sigmoid", n_group=8, top_k=1), "n_group", 8),  # groups of one expert
    (dict(router="topk_sigmoid", n_group=2, topk_group=3), "topk_group", 3),
    (dict(topk_group=0), "topk_group", 0),
    (dict(router="topk_sigmoid", n_group=4, topk_group=1, top_k=3), "top_k", 3),
    (dict(router="gshard_random2", top_k=1), "top_k", 1),
    (dict(normalize_topk=1), "normalize_topk", 1),
    (dict(router_bias="yes"), "router_bias", "yes"),
    (dict(shared_gate=True), "shared_gate", True),  # no shared experts to gate
    (dict(num_shared_experts=-1), "num_shared_experts", -1),
    (dict(num_shared_experts=True), "num_shared_experts", True),
    (dict(num_shared_experts=1, shared_d_ff=0), "shared_d_ff", 0),
    (dict(init_std=0.0), "init_std", 0.0),
    (dict(init_std=NAN), "init_std", NAN),
    (dict(jitter_eps=1.0), "jitter_eps", 1.0),
    (dict(jitter_eps=-0.1), "jitter_eps", -0.1),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor", 0.0),
    (dict(noise_eps=-1.0), "noise_eps", -1.0),
    (dict(router_options=[1]), "router_options", [1]),
    (dict(router_options={"temperature": 2.0}), "router_options", {"temperature": 2.0}),  # takes none
]


@pytest.mark.parametrize("overrides,field,value", BAD, ids=[f"{f}={v!r}" for _, f, v in BAD])
def test_bad_config_names_field_and_value(overrides, field, value):
    kw = dict(d_model=16, num_experts=8, top_k=2)
    kw.update(overrides)
    with pytest.raises(ValueError, match=re.escape(f"MoEConfig.{field}={value!r}")) as err:
        MoEConfig(**kw)
    assert "invalid" in str(err.value)


def test_there_are_at_least_25_bad_cases():
    assert len(BAD) >= 25 and len({f for _, f, _ in BAD}) >= 20


@pytest.mark.parametrize("field,registry", [("router", ROUTERS), ("dispatch", DISPATCHERS),
                                            ("expert", ACTIVATIONS), ("experts_impl", EXPERTS_IMPLS)])
def test_unknown_name_lists_the_valid_ones(field, registry):
    with pytest.raises(ValueError) as err:
        MoEConfig(**{field: "no_such_variant"})
    for name in registry.names():
        assert name in str(err.value)


def test_replace_is_validated_too():
    cfg = MoEConfig(d_model=16, num_experts=8, top_k=2)
    with pytest.raises(ValueError, match=re.escape("MoEConfig.top_k=9")):
        cfg.replace(top_k=9)


def test_from_dict_rejects_unknown_fields_and_round_trips():
    cfg = MoEConfig(d_model=16, num_experts=8, top_k=2, router="topk_sigmoid", n_group=2, topk_group=1,
                    num_shared_experts=1, shared_gate=True, aux_loss_coef=0.01)
    assert MoEConfig.from_dict(cfg.to_dict()) == cfg
    d = cfg.to_dict()
    d["num_expert"] = 8
    with pytest.raises(ValueError, match=r"num_expert"):
        MoEConfig.from_dict(d)


@pytest.mark.parametrize("router", ROUTERS.names())
def test_every_router_builds_from_defaults_with_its_name(router):
    """The registry and the config agree: every registered router is a valid name
    (with top_k=2, which every router accepts)."""
    assert MoEConfig(router=router, top_k=2).router == router


def test_defaults_are_valid():
    MoEConfig()


@pytest.mark.parametrize("kw,field", [
    (dict(router="topk_softmax", num_experts=8, n_group=2, topk_group=1), "n_group"),
    (dict(router="noisy_topk", jitter_eps=0.1), "jitter_eps"),
    (dict(router="topk_sigmoid", jitter_eps=0.1), "jitter_eps"),
    (dict(shared_d_ff=64), "shared_d_ff"),
])
def test_options_a_variant_would_ignore_are_rejected(kw, field):
    with pytest.raises(ValueError, match=rf"MoEConfig\.{field}=.*(does not use it|needs num_shared_experts)"):
        MoEConfig(**kw)


def test_options_are_accepted_by_the_routers_that_use_them():
    MoEConfig(router="topk_sigmoid", num_experts=8, n_group=4, topk_group=2, top_k=2)
    MoEConfig(router="topk_softmax", jitter_eps=0.1)
    MoEConfig(num_shared_experts=1, shared_d_ff=64)

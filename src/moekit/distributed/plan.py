"""`moekit plan`: per-device memory and all-to-all traffic of an MoE model at cluster scale.

A back-of-the-envelope model, stated so it can be checked (docs/plan.md explains each
term and puts published cluster figures beside it):

Layout  devices = PP · DP · TP. Non-expert weights are split over TP inside a pipeline
  stage; routed experts over EP inside a stage (no expert tensor parallelism), so EP must
  divide devices/PP and each expert has EDP = devices / (PP · EP) replicas. Layers are
  spread evenly over stages; the first stage also holds the input embedding and the last
  the LM head (both vocab-split over TP). We report the heavier end stage.
Bytes per parameter (mixed precision, Megatron-style): weights in --dtype, fp32 main
  gradients, optimizer state = fp32 master copy + Adam's two moments (fp32 unless
  --moment-dtype), ZeRO-1 shards the optimizer state over the parameter's DP replicas.
Activations  per in-flight micro-batch of mb·S tokens (sequence-parallel over TP);
  1F1B keeps min(PP, micro-batches) micro-batches in flight on the first stage.
  --recompute full: each layer stores only its input (D values per token), plus one
  layer's full working set during its recompute; none: every layer stores its working
  set (counted per token below: _layer_act_elems). Attention is flash-style (no S² scores).
All-to-all  per MoE layer and token: dispatch sends K copies of D values, combine returns
  them; backward repeats both (and full recompute a third forward). With uniform routing
  a fraction (EP-1)/EP of copies leave the device and 1 - G/EP leave the node (G devices
  per node). Bytes are what one device sends per optimizer step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from moekit.models.accounting import ParamReport, count_parameters

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "sgd": 1}  # moments per parameter


@dataclass(frozen=True)
class PlanInput:
    devices: int
    ep: int
    tp: int = 1
    pp: int = 1
    batch_tokens: int = 4 * 2**20  # tokens per optimizer step (global)
    seq: int = 4096
    micro_batch: int = 1  # sequences per micro-batch per DP replica
    dtype: str = "bf16"
    grad_dtype: str = "fp32"
    moment_dtype: str = "fp32"
    optimizer: str = "adam"
    zero: int = 1  # 0: replicated optimizer state; 1: sharded over DP replicas (ZeRO-1)
    recompute: str = "full"
    a2a_dtype: str | None = None  # dispatch/combine payload; None = dtype
    gpus_per_node: int = 8


@dataclass(frozen=True)
class Plan:
    inp: PlanInput
    dp: int
    edp: int
    micro_batches: int  # per DP replica per step
    moe_layers: int
    experts_per_device: int
    dense_params_per_device: float
    expert_params_per_device: float
    gb_weights: float
    gb_grads: float
    gb_optimizer: float
    gb_activations: float
    gb_total: float
    a2a_gb_per_step: float  # bytes one device sends in all-to-alls per optimizer step
    a2a_internode_gb_per_step: float
    a2a_internode_dedup_gb_per_step: float | None  # upper bound with node-limited routing
    tokens_per_device_per_step: float
    notes: tuple[str, ...]

    def to_dict(self) -> dict:
        return asdict(self)


def _bad(name: str, value, allowed: str) -> ValueError:
    return ValueError(f"plan: {name}={value!r} is invalid: {allowed}")


def check(inp: PlanInput, num_experts: int) -> None:
    for name in ("devices", "ep", "tp", "pp", "batch_tokens", "seq", "micro_batch", "gpus_per_node"):
        v = getattr(inp, name)
        if not isinstance(v, int) or v <= 0:
            raise _bad(name, v, "must be a positive integer")
    if inp.devices % (inp.tp * inp.pp):
        raise _bad("devices", inp.devices, f"must be divisible by tp·pp = {inp.tp * inp.pp}")
    if (inp.devices // inp.pp) % inp.ep:
        raise _bad("ep", inp.ep, f"must divide devices/pp = {inp.devices // inp.pp}")
    if num_experts % inp.ep:
        raise _bad("ep", inp.ep, f"must divide num_experts = {num_experts}")
    for name in ("dtype", "grad_dtype", "moment_dtype"):
        if getattr(inp, name) not in DTYPE_BYTES:
            raise _bad(name, getattr(inp, name), f"valid: {', '.join(DTYPE_BYTES)}")
    if inp.a2a_dtype is not None and inp.a2a_dtype not in DTYPE_BYTES:
        raise _bad("a2a_dtype", inp.a2a_dtype, f"valid: {', '.join(DTYPE_BYTES)}")
    if inp.optimizer not in OPTIMIZER_STATES:
        raise _bad("optimizer", inp.optimizer, f"valid: {', '.join(OPTIMIZER_STATES)}")
    if inp.zero not in (0, 1):
        raise _bad("zero", inp.zero, "valid: 0, 1")
    if inp.recompute not in ("full", "none"):
        raise _bad("recompute", inp.recompute, "valid: 'full', 'none'")


@dataclass(frozen=True)
class Shapes:
    """Per-layer widths the activation and traffic terms need, read from config.json."""

    d: int
    layers: int
    moe_layers: int
    top_k: int
    num_experts: int
    f_moe: int  # routed expert hidden width (gated: per-expert params = 3·D·F)
    f_shared: int  # total shared-expert hidden width
    f_dense: int
    attn_per_token: int  # stored attention values per token, one layer
    vocab: int


def shapes_of(cfg: dict, rep: ParamReport) -> Shapes:
    d = cfg.get("hidden_size") or cfg.get("d_model")
    L = cfg.get("num_hidden_layers") or cfg.get("n_layers")
    E, K = rep.num_experts, rep.top_k
    router = next((p.params for p in rep.parts if p.name == "router"), 0)
    L_moe = round(router / (E * d)) if router else 0  # a router is E·D (+E bias) per MoE layer
    per_expert = rep.routed_expert_params / max(1, L_moe * E)
    f_moe = round(per_expert / (3 * d))  # gated (SwiGLU) experts: 3 matrices of D·F
    f_shared = round(rep.shared_expert_params / max(1, L_moe) / (3 * d))
    dense = next((p.params for p in rep.parts if p.name == "dense_mlp"), 0)
    f_dense = round(dense / max(1, L - L_moe) / (3 * d)) if L > L_moe else 0
    return Shapes(d, L, L_moe, K, E, f_moe, f_shared, f_dense, _attn_per_token(cfg, d), cfg["vocab_size"])


def _attn_per_token(cfg: dict, d: int) -> int:
    """Values one attention layer keeps per token for backward: its norm input and
    output, q, k, v, the attention output; MLA also its two latents (q and kv)."""
    h = cfg["num_attention_heads"]
    if cfg.get("kv_lora_rank"):
        dqk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
        dv = cfg["v_head_dim"]
        latents = (cfg.get("q_lora_rank") or 0) + cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
        return 2 * d + h * dqk * 2 + h * dv * 2 + latents
    hkv = cfg.get("num_key_value_heads") or h
    hd = cfg.get("head_dim") or d // h
    return 2 * d + h * hd + 2 * hkv * hd + h * hd


def _layer_act_elems(s: Shapes, moe: bool) -> float:
    """Stored values per token of one layer's working set (attention + FFN)."""
    if moe:
        # norm in/out, router logits (fp32 = 2 bf16 slots), K dispatched rows,
        # K·(2F) gate/up pre-activations, K·F activations, K expert outputs, shared FFN
        ffn = (2 * s.d + 2 * s.num_experts + s.top_k * (s.d + 3 * s.f_moe + s.d)
               + 3 * s.f_shared)
    else:
        ffn = 2 * s.d + 3 * s.f_dense
    return s.attn_per_token + ffn


def plan(cfg: dict, inp: PlanInput) -> Plan:
    rep = count_parameters(cfg, context_len=inp.seq)
    check(inp, rep.num_experts)
    s = shapes_of(cfg, rep)
    dp, edp = inp.devices // (inp.tp * inp.pp), inp.devices // (inp.pp * inp.ep)
    micro_batches = max(1, math.ceil(inp.batch_tokens / (dp * inp.micro_batch * inp.seq)))
    dense_dev, expert_dev = _params_per_device(rep, inp)
    weights, grads, optimizer = _state_bytes(dense_dev, expert_dev, dp, edp, inp)
    acts = _activation_bytes(s, inp, micro_batches)
    tokens_dev = inp.batch_tokens / dp / inp.tp  # each device's share of its replica's tokens
    a2a, internode, dedup = _a2a_bytes(cfg, s, inp, tokens_dev)
    gb = 1e9
    return Plan(inp, dp, edp, micro_batches, s.moe_layers, s.num_experts // inp.ep, dense_dev, expert_dev,
                weights / gb, grads / gb, optimizer / gb, acts / gb,
                (weights + grads + optimizer + acts) / gb, a2a / gb, internode / gb,
                None if dedup is None else dedup / gb, tokens_dev, _notes(cfg, s, inp))


def _params_per_device(rep: ParamReport, inp: PlanInput) -> tuple[float, float]:
    """(non-expert, routed-expert) parameters on the heavier end stage."""
    embed = rep.input_embedding
    head = next((p.params for p in rep.parts if p.name == "lm_head"), 0)
    layer_dense = rep.non_expert_params - embed - head + rep.shared_expert_params
    dense_dev = layer_dense / inp.pp / inp.tp + max(embed, head) / inp.tp
    return dense_dev, rep.routed_expert_params / inp.pp / inp.ep


def _state_bytes(dense_dev: float, expert_dev: float, dp: int, edp: int, inp: PlanInput):
    """Bytes of weights, gradients and optimizer state (fp32 master + moments, ZeRO-1)."""
    b = DTYPE_BYTES
    weights = (dense_dev + expert_dev) * b[inp.dtype]
    grads = (dense_dev + expert_dev) * b[inp.grad_dtype]
    per_param = 4 * (inp.dtype != "fp32") + OPTIMIZER_STATES[inp.optimizer] * b[inp.moment_dtype]
    shard_d, shard_e = (dp, edp) if inp.zero else (1, 1)
    return weights, grads, per_param * (dense_dev / shard_d + expert_dev / shard_e)


def _activation_bytes(s: Shapes, inp: PlanInput, micro_batches: int) -> float:
    tokens_mb = inp.micro_batch * inp.seq / inp.tp  # sequence parallel over TP
    in_flight = min(inp.pp, micro_batches)  # 1F1B, first stage
    layers_stage = math.ceil(s.layers / inp.pp)
    moe_stage = math.ceil(s.moe_layers / inp.pp)
    work = [_layer_act_elems(s, True)] * moe_stage + [_layer_act_elems(s, False)] * (layers_stage - moe_stage)
    if inp.recompute == "full":  # layer inputs of every in-flight micro-batch + one working set
        elems = (in_flight * layers_stage * s.d + max(work)) * tokens_mb
    else:
        elems = in_flight * sum(work) * tokens_mb
    logits = inp.micro_batch * inp.seq * s.vocab / inp.tp * 4  # fp32, vocab-split, last stage
    return elems * DTYPE_BYTES[inp.dtype] + logits


def _a2a_bytes(cfg: dict, s: Shapes, inp: PlanInput, tokens_dev: float):
    """(off-device, off-node, off-node with node-limited dedup or None) bytes sent per step."""
    passes = 6 if inp.recompute == "full" else 4  # fwd dispatch+combine, bwd both, (re-fwd)
    per_dev = (tokens_dev * math.ceil(s.moe_layers / inp.pp) * s.top_k * s.d
               * DTYPE_BYTES[inp.a2a_dtype or inp.dtype] * passes)
    internode = per_dev * max(0.0, 1 - inp.gpus_per_node / inp.ep)
    m = _node_limit(cfg, inp)  # DeepSeek-V3 §2.1.2/§3.2.2: a token goes to <= M nodes, once each
    dedup = None if m is None else per_dev / s.top_k * min(m, s.top_k)
    return per_dev * (inp.ep - 1) / inp.ep, internode, dedup


def _node_limit(cfg: dict, inp: PlanInput) -> int | None:
    """topk_group when the expert groups are the nodes of the EP group (n_group = nodes)."""
    nodes = inp.ep / inp.gpus_per_node
    if nodes > 1 and cfg.get("topk_group") and cfg.get("n_group") == round(nodes):
        return int(cfg["topk_group"])
    return None


def _notes(cfg: dict, s: Shapes, inp: PlanInput) -> tuple[str, ...]:
    notes = [f"{s.moe_layers} MoE layers of {s.layers}; routed expert width F={s.f_moe} (gated), "
             f"top-{s.top_k} of {s.num_experts}"]
    m = _node_limit(cfg, inp)
    if m is not None:
        notes.append(f"node-limited routing: n_group={cfg['n_group']} = nodes in the EP group, so each "
                     f"token reaches <= topk_group={m} nodes; sent once per node (then forwarded inside "
                     f"it), inter-node copies per token are <= {m} instead of {s.top_k}: 'dedup' bound")
    if cfg.get("num_nextn_predict_layers"):
        notes.append("multi-token-prediction module(s) not counted (about one extra MoE layer + "
                     "embedding/head on one stage)")
    return tuple(notes)


def format_plan(p: Plan, name: str = "") -> str:
    i = p.inp
    lines = [
        f"plan {name}: {i.devices} devices = PP {i.pp} x DP {p.dp} x TP {i.tp}; EP {i.ep} "
        f"(expert replicas EDP {p.edp}); {i.batch_tokens:,} tokens/step, seq {i.seq}, "
        f"micro-batch {i.micro_batch} seq ({p.micro_batches} per replica per step)",
        f"params / device   dense {p.dense_params_per_device / 1e9:.2f}B + experts "
        f"{p.expert_params_per_device / 1e9:.2f}B ({p.experts_per_device} experts x "
        f"{math.ceil(p.moe_layers / i.pp)} MoE layers)",
        f"memory / device   weights {p.gb_weights:.1f} GB ({i.dtype}) + grads {p.gb_grads:.1f} GB "
        f"({i.grad_dtype}) + optimizer {p.gb_optimizer:.1f} GB ({i.optimizer}, moments "
        f"{i.moment_dtype}, ZeRO-{i.zero}) + activations {p.gb_activations:.1f} GB "
        f"(recompute {i.recompute}) = {p.gb_total:.1f} GB",
        f"all-to-all        {p.a2a_gb_per_step:.1f} GB sent per device per step "
        f"({p.tokens_per_device_per_step:,.0f} tokens/device, payload {i.a2a_dtype or i.dtype}); "
        f"inter-node {p.a2a_internode_gb_per_step:.1f} GB ({i.gpus_per_node} devices/node)"
        + ("" if p.a2a_internode_dedup_gb_per_step is None
           else f", dedup <= {p.a2a_internode_dedup_gb_per_step:.1f} GB"),
    ]
    return "\n".join(lines + [f"note: {n}" for n in p.notes])

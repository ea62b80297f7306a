"""Named model presets: name -> function(vocab_size) -> LMConfig.

    tiny           the default MoE: trains on 2 CPU cores in minutes (byte vocab, seq 256)
    dense          a dense twin of `tiny` with the same active parameters per token
    micro          d 64 with 32 experts: trains on many tokens per parameter in minutes,
                   where an MoE's extra capacity shows (moekit compare)
    micro-dense    the dense twin of `micro`
    mixtral-like   few large experts, top-2, GQA, rope_theta 1e6 (Mixtral 8x7B's shape, scaled)
    deepseek-like  fine-grained experts + a shared expert, sigmoid routing with group
                   limits and bias balancing, first layer dense (DeepSeek-V3's shape, scaled)
"""

from __future__ import annotations

from collections.abc import Callable

from moekit.models.config import LMConfig
from moekit.moe.config import MoEConfig
from moekit.moe.experts import ACTIVATIONS
from moekit.registry import Registry

PRESETS: Registry[Callable[[int], LMConfig]] = Registry("preset")


def get_preset(name: str, vocab_size: int) -> LMConfig:
    return PRESETS.get(name)(vocab_size)


@PRESETS.register("tiny")
def tiny(vocab_size: int = 260) -> LMConfig:
    """d 128, 4 layers, 8 SwiGLU experts of width 128, top-2 (~0.7M active params)."""
    moe = MoEConfig(d_model=128, num_experts=8, top_k=2, d_ff=128, aux_loss_coef=0.01,
                    z_loss_coef=1e-3)
    return LMConfig(vocab_size=vocab_size, d_model=128, n_layers=4, n_heads=4, n_kv_heads=4,
                    max_seq_len=256, tie_embeddings=True, dense_d_ff=256, moe=moe)


def active_matched_d_ff(moe: MoEConfig) -> int:
    """Width of one dense FFN with the active parameters of an MoE layer.

    A token uses K routed experts of width F, the shared experts (S of width F_s) and the
    router (E x D). A (gated) FFN of width W has c·D·W parameters, c = 3 for gated kinds
    (gate, up, down), 2 otherwise. So
        c·D·W = c·D·(K·F + S·F_s) + E·D   =>   W = K·F + S·F_s + E / c,
    rounded. For `tiny` (K=2, F=128, E=8, SwiGLU): W = 256 + 8/3 = 259 (2.67 -> 3), an
    error of 0.33·3·D = 128 parameters per layer (0.02% of the model).
    """
    c = 3 if ACTIVATIONS.get(moe.expert).gated else 2
    shared = moe.num_shared_experts * (moe.shared_d_ff or moe.d_ff)
    return moe.top_k * moe.d_ff + shared + round(moe.num_experts / c)


def dense_twin(base: LMConfig) -> LMConfig:
    """base with every MoE layer replaced by a dense FFN of the same active parameters."""
    return base.replace(moe=None, dense_d_ff=active_matched_d_ff(base.moe), ffn_kind=base.moe.expert)


@PRESETS.register("dense")
def dense(vocab_size: int = 260) -> LMConfig:
    """`tiny` with every MoE layer replaced by a dense FFN of the same active parameters
    (active_matched_d_ff): the baseline for "does MoE help at equal compute per token"."""
    return dense_twin(tiny(vocab_size))


@PRESETS.register("micro")
def micro(vocab_size: int = 260) -> LMConfig:
    """d 64, 4 layers, 32 SwiGLU experts of width 64, top-2 (~0.19M active, 1.7M total).

    Why: at 2 CPU cores, `tiny` sees ~4 tokens per parameter in its default run and the
    MoE and its dense twin are both still far from what their size allows (their gap
    stayed within seed noise, README). A quarter of tiny's width trains ~4x as many
    tokens per second per parameter: 6000 steps of 32 x 128 tokens give ~130 tokens per
    active parameter, where the dense model's capacity limits it and the MoE's 8.8x
    as many parameters pay (Switch Transformer, Fedus et al. 2022, fig. 4: the gain
    grows with the number of experts). Measured (README, `moekit compare`): the MoE
    reaches the dense twin's final loss with at most half its FLOPs."""
    moe = MoEConfig(d_model=64, num_experts=32, top_k=2, d_ff=64, aux_loss_coef=0.01, z_loss_coef=1e-3)
    return LMConfig(vocab_size=vocab_size, d_model=64, n_layers=4, n_heads=4, n_kv_heads=4,
                    max_seq_len=256, tie_embeddings=True, dense_d_ff=128, moe=moe)


@PRESETS.register("micro-dense")
def micro_dense(vocab_size: int = 260) -> LMConfig:
    """`micro` with each MoE layer a dense FFN of the same active parameters."""
    return dense_twin(micro(vocab_size))


@PRESETS.register("mixtral-like")
def mixtral_like(vocab_size: int = 260) -> LMConfig:
    """Mixtral 8x7B (Jiang et al. 2024) scaled down: 8 experts of width 3.5·d, top-2
    softmax with renormalised weights, GQA 4:1, rope_theta 1e6, untied head, aux coef 0.02."""
    moe = MoEConfig(d_model=256, num_experts=8, top_k=2, d_ff=896, aux_loss_coef=0.02)
    return LMConfig(vocab_size=vocab_size, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2,
                    max_seq_len=512, rope_theta=1e6, tie_embeddings=False, dense_d_ff=896,
                    moe=moe)


@PRESETS.register("deepseek-like")
def deepseek_like(vocab_size: int = 260) -> LMConfig:
    """DeepSeek-V3 (DeepSeek-AI 2024) scaled down: 64 fine-grained experts of width d/4,
    top-6, one shared expert, sigmoid scores with 8 groups / 4 kept (eq. 12-16),
    routed_scaling_factor 2.5, aux-loss-free bias balancing plus a tiny sequence-wise
    loss, and the first layer dense (first_k_dense_replace). MLA is not modelled (GQA
    with G = H here)."""
    moe = MoEConfig(d_model=256, num_experts=64, top_k=6, d_ff=64, router="topk_sigmoid",
                    n_group=8, topk_group=4, routed_scaling_factor=2.5, num_shared_experts=1,
                    seq_aux_loss_coef=1e-4, bias_update_rate=1e-3)
    return LMConfig(vocab_size=vocab_size, d_model=256, n_layers=4, n_heads=8, n_kv_heads=8,
                    max_seq_len=512, tie_embeddings=False, dense_d_ff=704, first_k_dense=1,
                    moe=moe)

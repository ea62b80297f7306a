"""MoELM: a decoder-only language model whose FFNs are MoE layers or dense FFNs.

    input_ids_BS ─ embed ─▶ x_BSD
    for each block (pre-norm, two residual lines, nanoGPT style):
        x = x + attn(norm(x))             RoPE, causal GQA via SDPA, optional KV cache
        x = x + ffn(norm(x))              MoELayer (aux loss, routing stats) or DenseFFN
    norm ─ head (tied to the embedding or not) ─▶ logits_BSV; loss = mean CE over targets

Notable points
- Model code is single-device; parallelism wraps it from outside.
- Aux losses and routing stats are returned in LMOutput, never stored on modules.
- The token ids are passed to every MoE layer (hash routing needs them).
- NOTE: `mask` (B, S) marks real tokens for the MoE balance losses only. Attention is
  causal, so right padding never changes real tokens' outputs; mark padded targets
  -100 to keep them out of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers import Linear
from moekit.models.attention import build_attention
from moekit.models.config import LMConfig
from moekit.models.kv_cache import KVCache
from moekit.models.norm import build_norm
from moekit.models.rope import RopeTables, RotaryEmbedding
from moekit.moe import MoELayer, RoutingStats
from moekit.moe.experts import DenseFFN


@dataclass(frozen=True)
class LMOutput:
    logits: torch.Tensor  # (B, S, V)
    loss: torch.Tensor | None  # mean cross-entropy over targets != -100; None without targets
    aux_loss: torch.Tensor  # () sum of the MoE layers' weighted aux losses (0 if none)
    stats: list[RoutingStats | None]  # per layer; None for dense layers
    kv_cache: KVCache | None


@dataclass(frozen=True)
class DenseOutput:
    """A dense FFN's answer, shaped like MoEOutput so a block treats both alike."""

    y: torch.Tensor
    aux_loss: torch.Tensor | None = None
    stats: None = None


class DenseLayer(DenseFFN):
    """DenseFFN with the MoELayer call signature (token_ids and mask are not needed)."""

    def forward(self, x: torch.Tensor, *, token_ids=None, mask=None) -> DenseOutput:  # noqa: ARG002
        return DenseOutput(super().forward(x))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.attn = build_attention(cfg, layer_idx)
        self.ffn_norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        if cfg.is_moe_layer(layer_idx):
            self.ffn = MoELayer(cfg.moe)
        else:
            self.ffn = DenseLayer(cfg.d_model, cfg.dense_d_ff, cfg.ffn_kind, cfg.init_std)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BSD, rope: RopeTables, kv_cache, token_ids_BS, mask_BS):
        x_BSD = x_BSD + self.drop(self.attn(self.attn_norm(x_BSD), rope, kv_cache))
        ffn = self.ffn(self.ffn_norm(x_BSD), token_ids=token_ids_BS, mask=mask_BS)
        return x_BSD + self.drop(ffn.y), ffn


class MoELM(nn.Module):
    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.rope = RotaryEmbedding(cfg.head_size, cfg.max_seq_len, cfg.rope_theta)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights()
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def _init_weights(self) -> None:
        """N(0, init_std) for the embedding, head and attention projections; the FFNs and
        routers keep the init of their own modules (MoEConfig.init_std)."""
        for part in (self.embed, self.head, *(b.attn for b in self.layers)):
            for m in part.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=self.cfg.init_std)

    def forward(self, input_ids_BS: torch.Tensor, *, targets_BS: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, mask: torch.Tensor | None = None) -> LMOutput:
        start = self._start(input_ids_BS, kv_cache)
        S = input_ids_BS.shape[1]
        rope = self.rope(start, S)
        x_BSD = self.drop(self.embed(input_ids_BS))
        outs = []
        for block in self.layers:
            x_BSD, ffn = block(x_BSD, rope, kv_cache, input_ids_BS, mask)
            outs.append(ffn)
        if kv_cache is not None:
            kv_cache.advance(S)
        logits_BSV = self.head(self.norm(x_BSD))
        return LMOutput(
            logits=logits_BSV,
            loss=None if targets_BS is None else lm_loss(logits_BSV, targets_BS),
            aux_loss=sum((o.aux_loss for o in outs if o.aux_loss is not None),
                         start=x_BSD.new_zeros((), dtype=torch.float32)),
            stats=[o.stats for o in outs],
            kv_cache=kv_cache,
        )

    def _start(self, input_ids_BS: torch.Tensor, kv_cache: KVCache | None) -> int:
        """Position of the first new token; checks shapes before any work is done."""
        if input_ids_BS.dim() != 2:
            raise ValueError(f"MoELM: input_ids of shape {tuple(input_ids_BS.shape)}; expected (B, S)")
        B, S = input_ids_BS.shape
        if kv_cache is not None and kv_cache.batch != B:
            raise ValueError(f"MoELM: batch {B} does not match the KVCache's batch {kv_cache.batch}")
        start = 0 if kv_cache is None else kv_cache.offset
        if start + S > self.cfg.max_seq_len:
            raise ValueError(f"MoELM: positions up to {start + S} exceed max_seq_len={self.cfg.max_seq_len}")
        if kv_cache is not None:
            kv_cache.check_room(S)
        return start

    # ---- helpers
    def new_kv_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """An empty cache for `batch` sequences of up to max_len (default max_seq_len) tokens."""
        p = self.embed.weight
        return KVCache(self.cfg.n_layers, batch, self.cfg.n_kv_heads, max_len or self.cfg.max_seq_len,
                       self.cfg.head_size, dtype=p.dtype, device=p.device)

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.layers if isinstance(b.ffn, MoELayer)]

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied head counts once). Routed experts count at their
        global number, also when an expert-parallel wrapper holds only a slice here."""
        n = sum(p.numel() for p in self.parameters())
        for m in self.moe_layers():
            n += (m.cfg.num_experts - m.experts.w_in.shape[0]) * _per_expert(m)
        return n - self.embed.weight.numel() if exclude_embeddings else n

    def num_active_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters one token uses: all, minus the routed experts it is not sent to
        ((E - K) of the E experts per MoE layer). Routers and shared experts count fully."""
        n = self.num_parameters(exclude_embeddings)
        for m in self.moe_layers():
            n -= (m.cfg.num_experts - m.cfg.top_k) * _per_expert(m)
        return n


def _per_expert(m: MoELayer) -> int:
    """Parameters of one routed expert (from the local slice's shapes)."""
    return m.experts.w_in[0].numel() + m.experts.w_out[0].numel()


def lm_loss(logits_BSV: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over targets != -100 (fp32 log-softmax); 0 if none are set."""
    flat_V = logits_BSV.reshape(-1, logits_BSV.shape[-1]).float()
    total = F.cross_entropy(flat_V, targets_BS.reshape(-1), ignore_index=-100, reduction="sum")
    count = (targets_BS != -100).sum().clamp(min=1)
    return total / count

"""HFMoELM: moekit's MoELM with an HF family's RoPE tables and KV cache.

Everything else -- blocks, norms, MoELayer (router, dispatch, grouped experts),
head, loss, generation -- is MoELM's own; the family features live in the attention
variants ("hf_gqa", "mla") the config names.
"""

from __future__ import annotations

from pathlib import Path

from moekit.models.attention_mla import LatentKVCache
from moekit.models.hf.config import HFLMConfig
from moekit.models.hf.families.gpt_oss import ClampedSwiGLUExperts
from moekit.models.hf.families.llama4 import PrescaledSwiGLUExperts
from moekit.models.hf.rope import HFRotary
from moekit.models.kv_cache import KVCache
from moekit.models.lm import MoELM


class HFMoELM(MoELM):
    def __init__(self, cfg: HFLMConfig) -> None:
        super().__init__(cfg)
        # YaRN tables (and MLA's rope_dim = head_size) replace the plain RoPE tables
        self.rope = self.rope_tables()
        if cfg.prescale_experts:  # Llama 4: experts see score·x
            for layer in self.moe_layers():
                m = layer.cfg
                layer.experts = PrescaledSwiGLUExperts(m.num_experts, m.d_model, m.d_ff, m.init_std)
        if cfg.swiglu_limit is not None:  # GPT-OSS: biased, clamped SwiGLU experts
            for layer in self.moe_layers():
                m = layer.cfg
                layer.experts = ClampedSwiGLUExperts(m.num_experts, m.d_model, m.d_ff, cfg.swiglu_limit,
                                                     cfg.swiglu_alpha, m.init_std)

    def rope_tables(self) -> HFRotary:
        """The RoPE tables: buffers computed from the config, not weights (a model built
        on the meta device builds them again on its device)."""
        cfg = self.cfg
        return HFRotary(cfg.head_size, cfg.max_seq_len, cfg.rope_theta, cfg.rope)

    def new_kv_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        if self.cfg.attention != "mla":
            return super().new_kv_cache(batch, max_len)
        p = self.embed.weight
        return LatentKVCache(self.cfg.n_layers, batch, max_len or self.cfg.max_seq_len,
                             self.cfg.kv_lora_rank, self.cfg.head_size, dtype=p.dtype, device=p.device)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 4 * 2**30) -> None:
        """Write config.json + model.safetensors (or shards + index) that transformers loads."""
        from moekit.models.hf.saver import save_pretrained

        save_pretrained(self, path, max_shard_bytes=max_shard_bytes)

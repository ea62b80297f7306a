"""KVCache: preallocated keys and values per layer, and the position offset they share.

One forward with a cache writes its S new keys/values at [offset, offset + S) in every
layer, attends over [0, offset + S), and then the model advances the offset by S. The
buffers are allocated once at full length, so decoding never re-allocates or copies
the past (the cost HF's growing DynamicCache pays with torch.cat at every step).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(n_layers)]
        self.max_len = max_len
        self.offset = 0  # tokens already cached (the position of the next token)

    @property
    def batch(self) -> int:
        return self.k[0].shape[0]

    def check_room(self, new_tokens: int) -> None:
        if self.offset + new_tokens > self.max_len:
            raise ValueError(f"KVCache: {self.offset} cached + {new_tokens} new tokens exceed "
                             f"its max_len={self.max_len}")

    def update(self, layer: int, k_BHSd: torch.Tensor, v_BHSd: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new keys/values of one layer; return all of them so far (views)."""
        end = self.offset + k_BHSd.shape[2]
        self.k[layer][:, :, self.offset : end] = k_BHSd
        self.v[layer][:, :, self.offset : end] = v_BHSd
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Called once per forward, after every layer has written its n new entries."""
        self.offset += n

    def reset(self) -> None:
        self.offset = 0

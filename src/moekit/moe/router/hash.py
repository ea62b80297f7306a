"""Hash layers (Roller et al. 2021, "Hash Layers For Large Sparse Models", §3).

No learned router: a token's experts are a fixed function of its token id. A table
maps each id in [0, vocab_size) to top_k distinct experts drawn from a seeded generator
(the paper's "random hash"; each id gets a uniformly random set, so experts receive
about equal numbers of vocabulary entries); ids outside the table, or every id when
no vocab_size is given, use a fixed multiplicative hash (h(id) + j) mod E, j < top_k.
The k experts are weighted 1/top_k. The router's projection (`weight`, kept for a
uniform checkpoint layout) is unused: logits are zeros and probs uniform, so the
balance losses are defined (and constant).

router_options: vocab_size (int, optional), seed (int, default 0).
Needs `layer(x, token_ids=...)`; the ids must have x's leading shape.
"""

from __future__ import annotations

import torch

from moekit.moe.router.base import ROUTERS, Router, reject_unknown_options, router_dtype
from moekit.moe.types import Routing

_PRIME = 2_147_483_647  # 2^31 - 1: (id mod p) · a stays below 2^62, no int64 overflow


@ROUTERS.register("hash")
class HashRouter(Router):
    needs_token_ids = True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        opts = cfg.router_options
        g = torch.Generator().manual_seed(int(opts.get("seed", 0)))
        V = opts.get("vocab_size")
        # table_VK: top_k distinct experts per id (the first k of a random permutation)
        table = torch.rand(V, cfg.num_experts, generator=g).argsort(-1)[:, : cfg.top_k] if V else None
        self.register_buffer("table_VK", table if table is not None else torch.zeros(0, cfg.top_k, dtype=torch.long))
        a, b = torch.randint(1, _PRIME, (2,), generator=g).tolist()
        self.hash_a, self.hash_b = a, b

    @classmethod
    def check_config(cls, cfg) -> None:
        opts = cfg.router_options
        reject_unknown_options(cfg, ("vocab_size", "seed"))
        V = opts.get("vocab_size")
        if V is not None and (not isinstance(V, int) or isinstance(V, bool) or V <= 0):
            raise ValueError(f"MoEConfig.router_options['vocab_size']={V!r} is invalid: must be a positive integer")
        if not isinstance(opts.get("seed", 0), int):
            raise ValueError(f"MoEConfig.router_options['seed']={opts['seed']!r} is invalid: must be an integer")

    def expert_ids(self, token_ids_T: torch.Tensor) -> torch.Tensor:
        ids_T = token_ids_T.long()
        h_T = (torch.remainder(ids_T, _PRIME) * self.hash_a + self.hash_b) % _PRIME
        j_K = torch.arange(self.top_k, device=ids_T.device)
        ids_TK = (h_T.unsqueeze(1) + j_K) % self.num_experts  # fallback: k consecutive experts
        V = self.table_VK.shape[0]
        in_table_T = (ids_T >= 0) & (ids_T < V)
        if V:
            from_table_TK = self.table_VK[ids_T.clamp(0, V - 1)]
            ids_TK = torch.where(in_table_T.unsqueeze(1), from_table_TK, ids_TK)
        return ids_TK

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None) -> Routing:
        T, E = x_TD.shape[0], self.num_experts
        if token_ids_T is None:
            raise ValueError("router 'hash' routes by token id: call the layer as layer(x, token_ids=ids) "
                             "with ids of x's leading shape")
        if token_ids_T.numel() != T:
            raise ValueError(f"router 'hash': token_ids has {token_ids_T.numel()} elements, x has {T} tokens")
        ids_TK = self.expert_ids(token_ids_T.to(x_TD.device))
        dt = router_dtype(x_TD)
        weights_TK = torch.full(ids_TK.shape, 1.0 / self.top_k, device=x_TD.device, dtype=dt)
        logits_TE = torch.zeros(T, E, device=x_TD.device, dtype=dt)
        return Routing(ids_TK, weights_TK, logits_TE, torch.full_like(logits_TE, 1.0 / E))

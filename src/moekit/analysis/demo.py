"""A short demo of the layer: what `moekit demo` prints."""

from __future__ import annotations

import time

import torch

from moekit import MoEConfig, MoELayer


def layer_demo(tokens: int = 2048, steps: int = 3, router: str = "topk_softmax") -> None:
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=256, num_experts=16, top_k=2, d_ff=256, router=router,
                    aux_loss_coef=0.01, z_loss_coef=1e-3)
    layer = MoELayer(cfg)
    x = torch.randn(tokens, cfg.d_model, requires_grad=True)
    out = layer(x)
    ref = layer.experts(x, layer.dispatch(layer.router(x), cfg), backend="loop")
    fast = layer.experts(x, layer.dispatch(layer.router(x), cfg))
    print(f"config: {cfg.num_experts} experts, top-{cfg.top_k}, router={router}, "
          f"d_model={cfg.d_model}, d_ff={cfg.d_ff}")
    print(f"max |grouped - loop oracle| = {(fast - ref).abs().max().item():.2e}")
    t0 = time.perf_counter()
    for _ in range(steps):
        out = layer(x)
        (out.y.square().mean() + out.aux_loss).backward()
    dt = (time.perf_counter() - t0) / steps
    s = out.stats
    print(f"forward+backward: {dt * 1e3:.1f} ms/step, {tokens / dt:,.0f} tokens/s")
    print(f"aux_loss={out.aux_loss.item():.4f} losses="
          + ", ".join(f"{k}={v.item():.4f}" for k, v in out.losses.items()))
    print(f"tokens per expert: {s.tokens_per_expert.tolist()}")
    print(f"drop fraction={s.drop_fraction.item():.3f} router entropy={s.router_entropy.item():.3f} "
          f"dead experts={int(s.dead_experts)}")

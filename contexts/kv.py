"""Moving KV state in and out of transformers' ``DynamicCache`` without concatenation."""

from __future__ import annotations

import torch
from transformers import DynamicCache


def cache_layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def build_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], config) -> DynamicCache:
    """A cache holding exactly these tensors (no copy: ``DynamicLayer.update`` would cat).

    The batch's own caches append in place instead: ``backends.growing``.
    """
    cache = DynamicCache(config=config)
    for layer, (k, v) in zip(cache.layers, layers, strict=True):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
    return cache


def copy_to(tensors: list[torch.Tensor], device: torch.device, pin: bool) -> list[torch.Tensor]:
    """Copy into freshly allocated tensors on ``device`` (``copy_``, not ``cat``: 6x faster)."""
    out = []
    for t in tensors:
        dst = torch.empty(t.shape, dtype=t.dtype, device=device, pin_memory=pin)
        dst.copy_(t, non_blocking=pin)
        out.append(dst)
    if pin and torch.cuda.is_available():
        torch.cuda.synchronize()
    return out

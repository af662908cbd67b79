"""A logits-based context snapshot: KV tensors, last logits, and the request's own state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

TIER_DEVICE = "device"
TIER_HOST = "host"
TIER_RECOMPUTE = "recompute"


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class Snapshot:
    """Everything needed to continue a request with no recomputation.

    ``layers`` holds one (keys, values) pair per decoder layer; ``logits`` the last step's
    output so the next token is chosen without a forward pass; ``meta`` the backend's own
    per-request object (generated ids, position, sampling seed/step, detokenizer state),
    kept opaque here.  In the recompute tier ``layers`` and ``logits`` are dropped.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]] | None
    logits: torch.Tensor | None
    meta: Any
    tier: str = TIER_DEVICE
    last_used: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        if self.layers is None:
            return 0
        n = sum(tensor_bytes(k) + tensor_bytes(v) for k, v in self.layers)
        return n + (tensor_bytes(self.logits) if self.logits is not None else 0)

    def tensors(self) -> list[torch.Tensor]:
        if self.layers is None:
            return []
        out = [t for kv in self.layers for t in kv]
        return out + ([self.logits] if self.logits is not None else [])

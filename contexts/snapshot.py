"""A logits-based context snapshot: KV tensors, last logits, and the request's own state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from contexts.resident import Resident
from ipc.protocol import TIER_DEVICE

if TYPE_CHECKING:
    from contexts.disk import DiskFile


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class Snapshot:
    """Everything needed to continue a request with no recomputation.

    ``layers`` holds one (keys, values) pair per decoder layer; ``logits`` the last step's
    output so the next token is chosen without a forward pass; ``meta`` the backend's own
    per-request object (generated ids, position, sampling seed/step, detokenizer state),
    kept opaque here.  ``tokens`` is the KV's sequence length (what recomputing would cost),
    taken from the layers' shape when not given.  In the disk tier ``layers`` and ``logits``
    live in ``file``; in the recompute tier they are dropped.  In the device tier ``layers`` may
    be a ``Resident``: the context is still in the engine's own memory (llama.cpp's KV cache).
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]] | Resident | None
    logits: torch.Tensor | None
    meta: Any
    tier: str = TIER_DEVICE
    last_used: int = 0
    tokens: int = 0
    file: DiskFile | None = None
    ident: str = ""  # what the context was computed from (``disk.ids_digest``): matches a file to its request
    _nbytes: int | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.tokens and isinstance(self.layers, Resident):
            self.tokens = self.layers.tokens
        elif not self.tokens and self.layers and self.layers[0][0].dim() >= 2:
            self.tokens = int(self.layers[0][0].shape[-2])

    @property
    def nbytes(self) -> int:
        """Bytes held in this snapshot's tier (for the disk tier, the file's real size)."""
        if self.layers is None:
            return self.file.nbytes if self.file is not None else 0
        if self._nbytes is None:  # budgets sum this on every switch: count once per set of tensors
            n = self.layers.nbytes if self.resident else sum(tensor_bytes(k) + tensor_bytes(v) for k, v in self.layers)
            self._nbytes = n + (tensor_bytes(self.logits) if self.logits is not None else 0)
        return self._nbytes

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("layers", "logits"):  # tensors are replaced, never resized in place
            object.__setattr__(self, "_nbytes", None)
        object.__setattr__(self, name, value)

    @property
    def resident(self) -> bool:
        return isinstance(self.layers, Resident)

    def tensors(self) -> list[torch.Tensor]:
        """The layers' tensors and the logits (a resident context's layers are none of ours)."""
        if self.layers is None or self.resident:
            return [] if self.logits is None or self.layers is None else [self.logits]
        out = [t for kv in self.layers for t in kv]
        return out + ([self.logits] if self.logits is not None else [])

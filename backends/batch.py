"""The running batch of a worker: one left-padded KV cache shared by every decoding slot.

Requests join and leave between steps (continuous batching).  The batch cache has shape
[B, heads, L, dim] per layer; a row shorter than L is left-padded and masked.  Joining
pads once (the newcomer or the batch, whichever is shorter); leaving copies the row's
real suffix out (that is the context snapshot) and drops the row.  Each decode step feeds
one token per row with explicit position ids, so a row computes exactly what it would alone
up to the rounding of batched matrix products (greedy fp32 output is unchanged; measured).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from backends.sequence import Sequence
from contexts.kv import build_cache, cache_layers

Layers = list[tuple[torch.Tensor, torch.Tensor]]


def _left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    return F.pad(t, (0, 0, n, 0)) if n > 0 else t


class Batch:
    def __init__(self, model, config):
        self.model = model
        self.config = config
        self.seqs: list[Sequence] = []
        self.lengths: list[int] = []  # real (unpadded) KV length of each row
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [B, L], 1 where a row has a real token

    def __len__(self) -> int:
        return len(self.seqs)

    def __contains__(self, seq: Sequence) -> bool:
        return any(s is seq for s in self.seqs)

    @property
    def width(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def add(self, seq: Sequence, layers: Layers) -> None:
        """Join with the sequence's own (unpadded, batch-1) KV tensors."""
        n = layers[0][0].shape[-2]
        row_mask = torch.ones(1, n, dtype=torch.long, device=layers[0][0].device)
        if not self.seqs:
            self.cache, self.mask = build_cache(layers, self.config), row_mask
        else:
            width = max(self.width, n)
            grow, pad = width - self.width, width - n

            def join(rows: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
                return torch.cat([_left_pad(rows, grow), _left_pad(new, pad)])

            joined = [
                (join(bk, k), join(bv, v)) for (bk, bv), (k, v) in zip(cache_layers(self.cache), layers, strict=True)
            ]
            self.cache = build_cache(joined, self.config)
            self.mask = torch.cat([F.pad(self.mask, (grow, 0)), F.pad(row_mask, (pad, 0))])
        self.seqs.append(seq)
        self.lengths.append(n)

    def remove(self, seq: Sequence, keep_kv: bool = True) -> Layers | None:
        """Leave the batch; return the row's real KV as fresh contiguous tensors."""
        i = next(j for j, s in enumerate(self.seqs) if s is seq)
        start = self.width - self.lengths[i]
        layers = cache_layers(self.cache)
        del self.seqs[i], self.lengths[i]
        if not self.seqs:  # the last row: hand its tensors over as they are (no copy)
            self.cache = self.mask = None
            return [(k[:, :, start:], v[:, :, start:]) for k, v in layers] if keep_kv else None
        out = None
        if keep_kv:
            out = [(k[i : i + 1, :, start:].clone(), v[i : i + 1, :, start:].clone()) for k, v in layers]
        keep = torch.tensor([j for j in range(len(layers[0][0])) if j != i], device=self.mask.device)
        trim = self.width - max(self.lengths)  # columns that are padding in every remaining row
        self.cache = build_cache(
            [(k.index_select(0, keep)[:, :, trim:], v.index_select(0, keep)[:, :, trim:]) for k, v in layers],
            self.config,
        )
        self.mask = self.mask.index_select(0, keep)[:, trim:]
        return out

    @torch.inference_mode()
    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token per row; return next-token logits [B, vocab]."""
        device = self.mask.device
        x = torch.tensor(tokens, device=device).unsqueeze(1)
        pos = torch.tensor(self.lengths, device=device).unsqueeze(1)
        self.mask = F.pad(self.mask, (0, 1), value=1)
        out = self.model(input_ids=x, attention_mask=self.mask, position_ids=pos, cache=self.cache, use_cache=True)
        self.lengths = [n + 1 for n in self.lengths]
        return out.logits[:, -1, :]

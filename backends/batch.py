"""The running batch of a worker: one left-padded KV cache shared by every decoding slot.

Requests join and leave between steps (continuous batching).  The batch cache has shape
[B, heads, L, dim] per layer; a row shorter than L is left-padded and masked.  Leaving copies
the row's real suffix out (that is the context snapshot).  Joins and leaves are recorded and
applied together just before the next step, in one copy of the batch's KV: with round robin
at a short quantum, many rows change at every step, and rebuilding the batch once per change
would copy it B times.  When as many rows join as left and each newcomer fits the batch's width
(round robin's usual swap: one preempted, the next admitted), the newcomers are written into the
leavers' rows in place and the other rows are not touched: a copy of the newcomers' KV instead
of the whole batch's (the re-pack cost 5-19 ms at 16 rows, 3% of a round-robin pass).  A swap
keeps the batch's width, so it is done only while that stays within ``SWAP_SLACK`` of the
longest row; otherwise the re-pack shrinks the padding.  The batch's layers are
``backends.growing.GrowingLayer`` s: a step appends its token into spare columns instead of
concatenating the whole cache (6-9% of a 16-row decode step here), and a re-pack allocates
the spare columns up front.

Each decode step feeds one token per row with explicit position ids, so
a row computes exactly what it would alone up to the rounding of batched matrix products (greedy
fp32 output is unchanged; measured).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from backends.growing import capacity, growing_cache
from backends.sequence import Sequence
from contexts.kv import cache_layers

Layers = list[tuple[torch.Tensor, torch.Tensor]]
SWAP_SLACK = 16  # padding columns (or an eighth of the width) a swap in place may leave unused


class Batch:
    def __init__(self, model, config):
        self.model = model
        self.config = config
        self._rows: list[Sequence] = []  # rows of ``cache``, in order
        self._lengths: list[int] = []  # real (unpadded) KV length of each row of ``cache``
        self._gone: set[int] = set()  # indices of rows of ``cache`` that have left
        self._joining: list[tuple[Sequence, Layers]] = []  # to be appended at the next step
        self.cache: DynamicCache | None = None
        self.repacks = 0  # joins and leaves applied by copying the whole batch's KV
        self.swaps = 0  # ... by writing newcomers into leavers' rows in place

    @property
    def seqs(self) -> list[Sequence]:
        """The rows as the next step will run them (see ``_in_place``; else survivors, then newcomers)."""
        if self._in_place():
            rows = list(self._rows)
            for i, (s, _) in zip(sorted(self._gone), self._joining, strict=True):
                rows[i] = s
            return rows
        alive = [s for i, s in enumerate(self._rows) if i not in self._gone]
        return alive + [s for s, _ in self._joining]

    def _in_place(self) -> bool:
        """Whether the pending changes are a swap: newcomers take the leavers' rows, nothing is re-packed.

        Only while the batch stays about as wide as its longest row: a swap keeps the width, so
        swapping short newcomers in for a long leaver would leave every row padded (and every
        step computing) to a length nobody has any more; a re-pack shrinks it.
        """
        if self.cache is None or not self._joining or len(self._joining) != len(self._gone):
            return False
        width = self.width
        joining = [layers[0][0].shape[-2] for _, layers in self._joining]
        staying = [n for i, n in enumerate(self._lengths) if i not in self._gone]
        longest = max(joining + staying)
        return longest <= width and width - longest <= max(SWAP_SLACK, width // 8)

    def __len__(self) -> int:
        return len(self._rows) - len(self._gone) + len(self._joining)

    def __contains__(self, seq: Sequence) -> bool:
        return any(s is seq for s in self.seqs)

    @property
    def width(self) -> int:
        return 0 if self.cache is None else cache_layers(self.cache)[0][0].shape[-2]

    def add(self, seq: Sequence, layers: Layers) -> None:
        """Join with the sequence's own (unpadded, batch-1) KV tensors, from the next step on."""
        self._joining.append((seq, layers))

    def remove(self, seq: Sequence, keep_kv: bool = True) -> Layers | None:
        """Leave the batch; return the row's real KV as tensors of its own (a copy, or the joiner's own)."""
        for j, (s, layers) in enumerate(self._joining):
            if s is seq:
                del self._joining[j]
                return layers if keep_kv else None
        i = next(j for j, s in enumerate(self._rows) if s is seq and j not in self._gone)
        self._gone.add(i)
        start = self.width - self._lengths[i]
        layers = cache_layers(self.cache)
        if len(self._gone) == len(self._rows) and not self._joining:  # the last row: a copy only if padded
            # (views of a growing layer's buffer are not contiguous, and would hold its spare columns)
            out = None
            if keep_kv:
                out = [(k[i : i + 1, :, start:].contiguous(), v[i : i + 1, :, start:].contiguous()) for k, v in layers]
            self._reset()  # and the next newcomer starts a cache of its own width
            return out
        if not keep_kv:
            return None
        return [(k[i : i + 1, :, start:].clone(), v[i : i + 1, :, start:].clone()) for k, v in layers]

    def _reset(self) -> None:
        self._rows, self._lengths, self._gone, self.cache = [], [], set(), None

    def _apply(self) -> None:
        """Drop the rows that left and append the newcomers, copying the KV once (or swap in place)."""
        if not self._gone and not self._joining:
            return
        if self._in_place():
            self._swap_in_place()
            self.swaps += 1
            return
        keep = [i for i in range(len(self._rows)) if i not in self._gone]
        lengths = [self._lengths[i] for i in keep] + [layers[0][0].shape[-2] for _, layers in self._joining]
        rows = [self._rows[i] for i in keep] + [s for s, _ in self._joining]
        if not rows:
            self._reset()
            self._joining = []
            return
        if not self._gone and len(self._joining) == 1 and not self._rows:  # one newcomer: its tensors as they are
            self.cache = growing_cache(self._joining[0][1], self.config)
        else:
            width = max(lengths)
            cap = capacity(width)  # room to append steps in place (``GrowingLayer``)
            old = cache_layers(self.cache) if self.cache is not None else None
            new_layers = []
            for li in range(len(self._joining[0][1]) if self._joining else len(old)):
                pair = []
                for kv in (0, 1):
                    ref = self._joining[0][1][li][kv] if self._joining else old[li][kv]
                    buf = torch.empty(len(rows), ref.shape[1], cap, ref.shape[3], dtype=ref.dtype, device=ref.device)
                    self._copy_rows(buf[..., :width, :], old[li][kv] if old is not None else None, keep, li, kv, width)
                    pair.append(buf)
                new_layers.append(tuple(pair))
            self.cache = growing_cache(new_layers, self.config, length=width)
            self.repacks += 1
        self._rows, self._lengths, self._gone, self._joining = rows, lengths, set(), []

    def _swap_in_place(self) -> None:
        """Each newcomer, right-aligned, into a leaver's row (in row order); padding to its left zeroed."""
        width = self.width
        layers = cache_layers(self.cache)
        for i, (seq, own) in zip(sorted(self._gone), self._joining, strict=True):
            n = own[0][0].shape[-2]
            for (k, v), (nk, nv) in zip(layers, own, strict=True):
                for dst, src in ((k, nk), (v, nv)):
                    dst[i : i + 1, :, width - n :].copy_(src)
                    dst[i : i + 1, :, : width - n].zero_()
            self._rows[i], self._lengths[i] = seq, n
        self._gone, self._joining = set(), []

    def _copy_rows(
        self, out: torch.Tensor, old: torch.Tensor | None, keep: list[int], li: int, kv: int, width: int
    ) -> None:
        """Survivors (in runs of consecutive rows, one copy each), then each newcomer, right-aligned.

        Padding columns are zeroed (masked out, but they must hold finite numbers: 0 x NaN is NaN).
        """
        j = 0
        while j < len(keep):
            run = 1
            while j + run < len(keep) and keep[j + run] == keep[j] + run:
                run += 1
            n = max(self._lengths[i] for i in keep[j : j + run])
            out[j : j + run, :, width - n :].copy_(old[keep[j] : keep[j] + run, :, old.shape[-2] - n :])
            out[j : j + run, :, : width - n].zero_()
            j += run
        for r, (_, layers) in enumerate(self._joining, start=len(keep)):
            t = layers[li][kv]
            out[r : r + 1, :, width - t.shape[-2] :].copy_(t)
            out[r : r + 1, :, : width - t.shape[-2]].zero_()

    @torch.inference_mode()
    def step(self, tokens: dict[int, int]) -> tuple[list[Sequence], torch.Tensor]:
        """Feed one token per row (by request id); return the rows in order and their next-token logits [B, vocab].

        Tokens are keyed, not ordered: rows that leave while the tokens are chosen change the order
        the pending joins are applied in (a swap in place, or a re-pack).
        """
        self._apply()
        if sorted(tokens) != sorted(s.rid for s in self._rows):
            raise ValueError(f"tokens for requests {sorted(tokens)}, the batch holds {[s.rid for s in self._rows]}")
        lengths = torch.tensor(self._lengths)
        device = cache_layers(self.cache)[0][0].device
        width = self.width + 1
        mask = (torch.arange(width) >= width - 1 - lengths.unsqueeze(1)).long().to(device)
        x = torch.tensor([tokens[s.rid] for s in self._rows], device=device).unsqueeze(1)
        pos = lengths.unsqueeze(1).to(device)
        out = self.model(input_ids=x, attention_mask=mask, position_ids=pos, cache=self.cache, use_cache=True)
        self._lengths = [n + 1 for n in self._lengths]
        return list(self._rows), out.logits[:, -1, :]

"""A grammar's allowed-token bitmask on CPU logits, in plain torch.

llguidance's own ``llguidance.torch`` wraps its kernel in ``torch.compile``: importing it pulls in
dynamo and inductor (~2.7 s of every worker's start, measured here), and its first call in a
process compiles C++ with the system compiler (~24 s on a fresh machine, ~2 s from inductor's
cache).  The same arithmetic unjitted costs well under a millisecond for a 49k vocabulary.
"""

from __future__ import annotations

import llguidance
import torch

_BITS = torch.arange(32, dtype=torch.int32)


def allocate(vocab_size: int) -> torch.Tensor:
    """One row of ``ceil(vocab / 32)`` int32 words, every token allowed."""
    return torch.full(((vocab_size + 31) // 32,), -1, dtype=torch.int32)


def fill(matcher: llguidance.LLMatcher, mask: torch.Tensor) -> None:
    """The matcher writes the tokens its grammar allows next into ``mask``, one bit each."""
    matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * mask.element_size())


def apply(logits: torch.Tensor, mask: torch.Tensor) -> None:
    """Sets every token the mask forbids to -inf in a ``(1, vocab)`` float tensor, in place."""
    vocab = logits.shape[-1]
    allowed = ((mask.unsqueeze(-1) >> _BITS) & 1).reshape(-1).bool()
    if allowed.numel() < vocab:  # a vocabulary past the grammar's tokenizer: those ids are never allowed
        allowed = torch.cat([allowed, allowed.new_zeros(vocab - allowed.numel())])
    logits.masked_fill_(~allowed[:vocab].unsqueeze(0), float("-inf"))

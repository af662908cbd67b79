"""Closing a JSON output before ``max_tokens`` cuts it: the last tokens are chosen to end it.

A grammar keeps every token valid, but not the whole: a model that keeps adding keys or
nesting is cut by ``max_tokens`` in the middle, and the client gets invalid JSON.  So as
the budget runs out (no more tokens left than the open strings and brackets need, plus a
margin), the choice is narrowed, within what the grammar allows, to tokens made only of
closing characters (a quote while inside a string), and the most likely of them is taken.
The grammar then completes and the request ends, with ``finish_reason: "length"`` (the
budget ended it) and valid JSON.  Everything here is a function of the tokens generated, so
it needs no state in a snapshot beyond what replaying the tokens rebuilds.
"""

from __future__ import annotations

from typing import Any

import torch

CLOSING = set('"}]:0')  # with ':' and '0' a key or a value that must come first can be finished
MARGIN = 3  # tokens beyond the open brackets and string: a ':' and a value a key may still need


class Closers:
    """The tokenizer's tokens made only of closing characters (per worker, built once)."""

    def __init__(self, tokenizer: Any):
        self.pieces: list[str] = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        ids = [i for i, p in enumerate(self.pieces) if p.strip() and set(p.strip()) <= CLOSING]
        self.any = torch.tensor(ids, dtype=torch.long)
        self.quotes = torch.tensor([i for i in ids if '"' in self.pieces[i]], dtype=torch.long)


class JsonDepth:
    """How much of a JSON text is still open: brackets, and whether it stands inside a string."""

    def __init__(self) -> None:
        self.stack = 0
        self.in_string = False
        self.escape = False

    def feed(self, text: str) -> None:
        for ch in text:
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.stack += 1
            elif ch in "}]" and self.stack:
                self.stack -= 1

    @property
    def to_close(self) -> int:
        """Tokens that may be needed to close everything (an upper bound with the margin)."""
        return self.stack + int(self.in_string) + MARGIN


def narrow(masked: torch.Tensor, closers: Closers, depth: JsonDepth) -> torch.Tensor | None:
    """``masked`` logits (grammar applied) kept only on closing tokens; None when the grammar allows none."""
    ids = closers.quotes if depth.in_string else closers.any
    ids = ids[ids < masked.shape[-1]]
    vals = masked[0, ids]
    if not torch.isfinite(vals).any():
        return None
    out = torch.full_like(masked, float("-inf"))
    out[0, ids] = vals
    return out

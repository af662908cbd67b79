"""Choosing the next token from logits, reproducibly.

The random stream of a request is a pure function of (seed, step): each step seeds its
own generator.  So the "RNG state" in a snapshot is just two integers, and a request
restarted on another worker from its emitted tokens samples exactly what it would have.
"""

from __future__ import annotations

import torch

_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 63) - 1


def step_seed(seed: int, step: int) -> int:
    return (seed ^ ((step + 1) * _GOLDEN)) & _MASK


def choose(logits: torch.Tensor, temperature: float, top_p: float, seed: int, step: int) -> int:
    """Greedy when ``temperature`` is 0, else temperature + nucleus sampling."""
    row = logits.reshape(-1).float().cpu()
    if temperature <= 0.0:
        return int(torch.argmax(row))
    probs = torch.softmax(row / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    gen = torch.Generator(device="cpu")
    gen.manual_seed(step_seed(seed, step))
    return int(torch.multinomial(probs, 1, generator=gen))

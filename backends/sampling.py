"""Choosing the next token from logits, reproducibly.

The random stream of a request is a pure function of (seed, step): each step seeds its
own generator.  So the "RNG state" in a snapshot is just two integers, and a request
restarted on another worker from its emitted tokens samples exactly what it would have.

The sampling controls are pure functions of the request's parameters and its token ids (the
prompt and what it generated), so they need no state of their own either: a preempted or
restarted request is shaped exactly as an uninterrupted one.  They follow vLLM's definitions:
``logit_bias`` is added first; ``repetition_penalty`` divides the positive logits (multiplies the
negative ones) of every token in the prompt or the output; ``frequency_penalty`` subtracts
itself times a token's count in the output, ``presence_penalty`` itself once for a token
present there; then temperature, ``min_p`` (drop tokens under ``min_p`` times the top
probability), ``top_k`` and ``top_p``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ipc.chat_params import ChatParams

_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 63) - 1


def step_seed(seed: int, step: int) -> int:
    return (seed ^ ((step + 1) * _GOLDEN)) & _MASK


def shaped(params: ChatParams | Mapping[str, Any]) -> bool:
    """Whether the logits are changed before the choice (a greedy row then needs its own argmax)."""
    params = ChatParams.of(params)
    return bool(
        params.logit_bias or params.frequency_penalty or params.presence_penalty or params.repetition_penalty != 1.0
    )


def shape(
    logits: torch.Tensor, params: ChatParams | Mapping[str, Any], prompt_ids: list[int], generated: list[int]
) -> torch.Tensor:
    """``logits`` with the request's bias and penalties applied (a new tensor; the input is kept)."""
    params = ChatParams.of(params)
    row = logits.reshape(-1).float().clone()
    vocab = row.numel()
    for token, bias in params.logit_bias.items():
        if 0 <= int(token) < vocab:
            row[int(token)] += float(bias)
    rep = params.repetition_penalty
    if rep != 1.0 and (prompt_ids or generated):
        seen = torch.unique(torch.tensor(prompt_ids + generated, dtype=torch.long).clamp_(0, vocab - 1))
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / rep, vals * rep)
    freq, pres = params.frequency_penalty, params.presence_penalty
    if (freq or pres) and generated:
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long).clamp_(0, vocab - 1), minlength=vocab)
        row -= freq * counts.float() + pres * (counts > 0).float()
    return row


def choose(
    logits: torch.Tensor, temperature: float, top_p: float, seed: int, step: int, top_k: int = 0, min_p: float = 0.0
) -> int:
    """Greedy when ``temperature`` is 0, else temperature, ``min_p``, ``top_k`` and nucleus sampling."""
    row = logits.reshape(-1).float().cpu()
    if temperature <= 0.0:
        return int(torch.argmax(row))
    probs = torch.softmax(row / temperature, dim=-1)
    if min_p > 0.0:
        probs = torch.where(probs >= min_p * probs.max(), probs, torch.zeros_like(probs))
    if 0 < top_k < probs.numel():
        kth = torch.topk(probs, top_k).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if top_p < 1.0:
        probs = probs / probs.sum()
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    gen = torch.Generator(device="cpu")
    gen.manual_seed(step_seed(seed, step))
    return int(torch.multinomial(probs, 1, generator=gen))

"""Chat rendering and the EOS mask, shared by the local engines (both use a HuggingFace tokenizer)."""

from __future__ import annotations

import torch


def render(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of a chat, with the generation prompt, via the model's chat template."""
    enc = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
    ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
    return list(ids)


def without_eos(logits: torch.Tensor, eos_ids: set[int]) -> torch.Tensor:
    """A copy of ``logits`` in which no end-of-sequence token can be chosen (``min_tokens``)."""
    out = logits.clone()
    out[..., sorted(eos_ids)] = float("-inf")
    return out

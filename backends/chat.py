"""Chat rendering and the EOS mask, shared by the local engines (both use a HuggingFace tokenizer)."""

from __future__ import annotations

import torch

from ipc import protocol as P


def render(tokenizer, messages: list[dict], tools: list[dict] | None = None, extra: dict | None = None) -> list[int]:
    """Token ids of a chat, with the generation prompt, via the model's chat template (``extra``: its variables)."""
    enc = tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=True, tokenize=True, **(extra or {})
    )
    ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
    return list(ids)


def without_eos(logits: torch.Tensor, eos_ids: set[int]) -> torch.Tensor:
    """A copy of ``logits`` in which no end-of-sequence token can be chosen (``min_tokens``)."""
    out = logits.clone()
    out[..., sorted(eos_ids)] = float("-inf")
    return out


def encode_prompt(tokenizer, prompt: str | list[int]) -> list[int]:
    """A completion's prompt ids: its text tokenized as it is (the tokenizer's own BOS, if any), or ids checked."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    vocab = len(tokenizer)
    if any(not 0 <= t < vocab for t in prompt):
        raise P.ProtocolError(P.E_BAD_FIELD, f"'prompt' holds token ids outside the vocabulary [0, {vocab})")
    return list(prompt)

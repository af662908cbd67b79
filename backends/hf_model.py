"""A HuggingFace causal LM run as an incremental loop over its KV cache (the HF engine's model).

Prefill feeds the prompt once; each decode step feeds exactly one token.  The counters
``prefill_tokens`` and ``decode_tokens`` count every token that goes through the model,
so tests can prove that a resume recomputed nothing.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from backends import chat


class HFModel:
    def __init__(self, model_dir: str, device: str = "cpu", dtype: str = "float32"):
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
        self.config = self.model.config
        self.eos_ids = self._eos_ids()
        self.prefill_tokens = 0
        self.decode_tokens = 0

    def _eos_ids(self) -> set[int]:
        ids = set()
        for source in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        return ids

    def without_eos(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of ``logits`` in which no end-of-sequence token can be chosen (``min_tokens``)."""
        return chat.without_eos(logits, self.eos_ids)

    def render(self, messages: list[dict], tools: list[dict] | None = None, extra: dict | None = None) -> list[int]:
        """Token ids of a chat, with the generation prompt, via the model's chat template."""
        return chat.render(self.tokenizer, messages, tools, extra)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    @torch.inference_mode()
    def prefill(self, ids: list[int], cache: DynamicCache | None = None) -> tuple[DynamicCache, torch.Tensor]:
        """Feed ``ids`` after what ``cache`` holds (a new cache if None); return it and the last logits."""
        cache = self.new_cache() if cache is None else cache
        x = torch.tensor([ids], device=self.device)
        out = self.model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1)
        self.prefill_tokens += len(ids)
        return cache, out.logits[:, -1, :]

    @torch.inference_mode()
    def prefill_many(self, rows: list[list[int]]) -> list[tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]]:
        """Prefill several fresh prompts in one left-padded forward (about twice the speed of one by one
        here); return each row's own KV (its real suffix, copied out) and last logits.

        Rows do not see each other (attention mask, explicit positions), so each row's KV and logits
        equal a prefill alone up to the rounding of batched products (identical in fp32 on CPU, measured).
        """
        width = max(len(r) for r in rows)
        pad = int(self.tokenizer.pad_token_id or 0)
        x = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = self.new_cache()
        out = self.model(
            input_ids=x, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1
        )
        self.prefill_tokens += sum(len(r) for r in rows)
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        out_rows = []
        for i, r in enumerate(rows):
            start = width - len(r)
            own = [(k[i : i + 1, :, start:].clone(), v[i : i + 1, :, start:].clone()) for k, v in kv]
            out_rows.append((own, out.logits[i : i + 1, -1, :].clone()))
        return out_rows

    @torch.inference_mode()
    def decode(self, cache: DynamicCache, token: int) -> torch.Tensor:
        x = torch.tensor([[token]], device=self.device)
        out = self.model(input_ids=x, cache=cache, use_cache=True)
        self.decode_tokens += 1
        return out.logits[:, -1, :]

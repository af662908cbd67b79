"""Migration: with two workers, a preempted context moves to the worker with a free slot,
as raw tensor frames, and the output stays token-identical."""

import asyncio

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import messages

PROMPTS = [f"Request number {i}: tell me something." for i in range(6)]


def test_migrating_contexts_changes_nothing(tiny_model_dir, start_daemon):
    d = start_daemon(tiny_model_dir, "--workers", "2", "--quantum-tokens", "2", "--snapshot-tier", "host")

    async def go():
        async with d.aclient() as c:
            return await asyncio.gather(*(c.chat(messages(p), max_tokens=24) for p in PROMPTS))

    results = asyncio.run(go())
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for p, r in zip(PROMPTS, results, strict=True):
        ids = tok.apply_chat_template(messages(p), add_generation_prompt=True, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            ref = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()  # fmt: skip
        assert r.token_ids == ref
        assert r.stats["prompt_tokens_computed"] == r.usage["prompt_tokens"]  # migration recomputed nothing
        assert r.stats["decode_tokens_computed"] == r.usage["completion_tokens"] - 1
    migrated = [e for r in results for e in r.events if e.event == "resumed" and e.data.get("migrated")]
    assert migrated, "no request migrated"
    assert sum(r.stats["migrations"] for r in results) == len(migrated)
    workers = {e.data["worker"] for r in results for e in r.events if e.event == "resumed"}
    assert workers == {"w0", "w1"}

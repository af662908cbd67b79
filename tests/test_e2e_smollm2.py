"""End to end on the real default model (SmolLM2-135M-Instruct), as a user runs it."""

import asyncio
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import REPO, messages

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 plus 2?"]


def test_default_model_answers_and_preemption_changes_nothing(smollm2_dir, start_daemon):
    d = start_daemon("smollm2", "--quantum-tokens", "3")

    async def ask():
        async with d.aclient(agent="e2e") as c:
            return await asyncio.gather(*(c.chat(messages(q), max_tokens=24) for q in QUESTIONS))

    results = asyncio.run(ask())
    assert "Paris" in results[0].text
    assert sum(r.stats["preemptions"] for r in results) >= 2

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    for q, r in zip(QUESTIONS, results, strict=True):
        ids = tok.apply_chat_template(messages(q), add_generation_prompt=True, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=24, do_sample=False)
        assert r.token_ids == out[0, ids.shape[1] :].tolist()
        assert r.stats["prompt_tokens_computed"] == r.usage["prompt_tokens"]


def test_demo_command_runs(smollm2_dir):
    out = subprocess.run([sys.executable, "-m", "scheduler", "demo"], capture_output=True, text=True,
                         timeout=600, cwd=REPO)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Paris" in out.stdout and "preempted" in out.stdout and "resumed" in out.stdout

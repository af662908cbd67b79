"""End to end on the real default model (SmolLM2-135M-Instruct), as a user runs it."""

import asyncio
import subprocess
import sys

import pytest

from tests.conftest import REPO, hf_greedy, messages

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 2 plus 2?"]


def test_default_model_answers_and_preemption_changes_nothing(smollm2_dir, start_daemon):
    d = start_daemon("smollm2", "--backend", "hf", "--quantum-tokens", "3")

    async def ask():
        async with d.aclient(agent="e2e") as c:
            return await asyncio.gather(*(c.chat(messages(q), max_tokens=24) for q in QUESTIONS))

    results = asyncio.run(ask())
    assert "Paris" in results[0].text
    assert sum(r.stats["preemptions"] for r in results) >= 2

    for ref, r in zip(hf_greedy(smollm2_dir, QUESTIONS, 24), results, strict=True):
        assert r.token_ids == ref
        assert r.stats["prompt_tokens_computed"] == r.usage["prompt_tokens"]


def test_demo_command_runs(smollm2_dir):
    out = subprocess.run([sys.executable, "-m", "console", "demo"], capture_output=True, text=True,
                         timeout=600, cwd=REPO)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Paris" in out.stdout and "preempted" in out.stdout and "resumed" in out.stdout

"""Fixtures: the real default model, a seeded tiny Llama, and real daemon processes."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from ipc.client import AsyncClient, Client
from ipc.launcher import DaemonProcess

REPO = Path(__file__).resolve().parent.parent

# One torch thread in this process and in every daemon and worker it starts (they inherit it): a
# test runs several torch processes at once on 2 cores, and two threads each oversubscribe them
# (the SmolLM2 tests ran ~10% faster with one thread on an idle machine, and far faster on a
# busy one).  llama.cpp sets its own thread count; a caller's own setting is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded default model, converted once into the user's cache (as ``quantad serve`` does)."""
    from backends.model_store import resolve

    return resolve("smollm2")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A seeded random 2-layer Llama with the SmolLM2 tokenizer, saved and loaded like any model."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(1234)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    # Sharper logits than the default init, so greedy choices are not near-ties.
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


class DaemonProc:
    """``quantad serve`` as a real subprocess with its own runtime directory (an ``ipc.launcher.DaemonProcess``)."""

    def __init__(self, model_dir: Path, tmp: Path, *args: str):
        self.tmp = tmp
        self.state_dir = tmp / "state"
        env = {"QUANTAD_RUNTIME_DIR": str(tmp), "QUANTAD_STATE_DIR": str(self.state_dir)}
        ep, log = f"ipc://{tmp}/agents.sock", tmp / "daemon.log"
        self.daemon = DaemonProcess("--model", str(model_dir), *args, endpoint=ep, env=env, log=log, cwd=REPO)
        self.endpoint, self.log_path = self.daemon.endpoint, self.daemon.log_path
        self.proc = self.daemon.start().proc

    @functools.cached_property
    def urls(self) -> dict[str, str]:
        """Its listening endpoints as ``stats`` gives them (``http`` with ``--http 127.0.0.1:0``: the port it took)."""
        with self.client(timeout=30) as c:
            return c.stats()["endpoints"]

    def openai(self, **kw):
        """The official OpenAI client on its HTTP front (no token, no retries)."""
        from openai import OpenAI

        return OpenAI(
            base_url=self.urls["http"] + "/v1",
            api_key=kw.pop("api_key", "x"),
            max_retries=0,
            timeout=kw.pop("timeout", 300),
            **kw,
        )

    def wait_ready(self, timeout: float = 180.0) -> None:
        self.daemon.wait_ready(timeout)

    def log(self) -> str:
        return self.daemon.log()

    def client(self, **kw) -> Client:
        return self.daemon.client(**kw)

    def aclient(self, **kw) -> AsyncClient:
        return self.daemon.aclient(**kw)

    def worker_pids(self) -> list[int]:
        with self.client() as c:
            return [w["pid"] for w in c.ps()["workers"] if w.get("pid")]

    def stop(self) -> int:
        return self.daemon.stop()  # SIGTERM, then SIGINT: a second signal cuts the drain, teardown need not wait


@pytest.fixture
def start_daemon(tmp_path_factory):
    """Factory: ``start_daemon(model_dir, *flags)``; every daemon is stopped at teardown."""
    started: list[DaemonProc] = []

    def start(model_dir: Path, *args: str) -> DaemonProc:
        d = DaemonProc(model_dir, tmp_path_factory.mktemp("qd"), *args)
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain recursion in one sentence.",
    "Say hello.",
]


def messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def hf_greedy(model_dir, prompts: list[str], max_tokens: int | list[int]) -> list[list[int]]:
    """The reference: uninterrupted greedy generation by transformers' own ``generate``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    limits = max_tokens if isinstance(max_tokens, list) else [max_tokens] * len(prompts)
    out = []
    for p, n in zip(prompts, limits, strict=True):
        ids = tok.apply_chat_template(messages(p), add_generation_prompt=True, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            gen = model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)  # fmt: skip
        out.append(gen[0, ids.shape[1] :].tolist())
    return out

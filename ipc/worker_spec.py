"""Every worker option and its default, once: the daemon builds a worker's command line from it, the worker parses it.

The daemon never imports a backend, so it starts each worker by command line; this record is
the one place that knows those flags.  ``WorkerSpec.parse(spec.argv()[3:]) == spec`` holds for
every spec (``tests/test_units.py``).  The API key itself never goes on a command line, only
where to find it (``api_key_env`` / ``api_key_file``).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ipc import protocol as P

BACKENDS = ("hf", "llamacpp", "openai")
DTYPES = ("float32", "bfloat16", "float16")
SNAPSHOT_TIERS = ("auto", P.TIER_DEVICE, P.TIER_HOST, P.TIER_DISK, P.TIER_RECOMPUTE)
RESUME_METHODS = ("auto", "prefix", "completions", "none")
WORKER_MODULE = "backends.worker"
LLAMA_MAX_SEQ = 256  # llama.cpp's LLAMA_MAX_SEQ
LLAMA_SEQ_CTX = 2048  # cells per sequence id when the cache's size is not given (46 MiB each for the default model)


def llama_seq_ids(slots: int) -> int:
    """A llama.cpp worker's sequence ids: its running rows, and room for suspended ones."""
    return min(LLAMA_MAX_SEQ, slots + max(2, slots // 2))


def llama_seq_cells(slots: int, ctx_size: int) -> int:
    """Each sequence id's cells of the KV cache (what bounds one request's context, with the trained window)."""
    return ctx_size // llama_seq_ids(slots) if ctx_size else LLAMA_SEQ_CTX


# A llama.cpp worker on CUDA loads torch's CUDA libraries and llama.cpp's libggml-cuda into one
# process, and libggml-cuda's copies of libstdc++ template symbols then win the lookup: llama.cpp's
# tokenizer regex segfaulted in std::codecvt, from libggml-cuda, on the first model load (an H200,
# CUDA 13.0, torch 2.11, 2026-12-04).  Preloading the real libstdc++ puts its symbols first; with it
# the same worker ran the burst benchmark.  CPU workers are left as they are.
CUDA_LLAMACPP_PRELOAD = "libstdc++.so.6"


@dataclass(frozen=True)
class WorkerSpec:
    backend: str = "hf"
    endpoint: str = ""  # the daemon's worker endpoint
    name: str = ""  # fixed routing id, so a reconnect is recognised
    model: str = ""  # a model directory (hf), or the remote model's name (openai)
    slots: int = 1
    heartbeat_s: float = 1.0
    credentials: str = "none"  # stdin: one JSON line from the daemon that started it (``ipc.credentials``)
    # Local engines.
    device: str = "cpu"
    dtype: str = "float32"
    device_budget: int = 512 << 20  # bytes of suspended KV kept in place
    host_budget: int = 4 << 30  # bytes of KV swapped to host memory
    disk_budget: int = 8 << 30  # bytes of KV in snapshot files
    snapshot_tier: str = "auto"
    state_dir: str | None = None  # this worker's own directory for disk snapshots (None: no disk tier)
    prefill_chunk: int = P.DEFAULT_PREFILL_CHUNK
    peer_endpoint: str = "auto"  # inbox for migrating contexts (auto: beside an ipc:// endpoint; '': none)
    # llama.cpp.
    threads: int = 0  # compute threads (0: every core)
    ctx_size: int = 0  # cells of the KV cache, split evenly between the sequence ids (0: 2048 per id)
    prefix_cache: int = -1  # bytes of recent prompts' and ended conversations' states (0: off; -1: auto)
    # OpenAI-compatible endpoints.
    base_url: str | None = None
    api_key_env: str | None = None
    api_key_file: str | None = None
    tokenizer: str | None = None
    api_timeout_s: float = 60.0
    api_retries: int = 4
    resume_method: str = "auto"

    def named(self, name: str) -> WorkerSpec:
        """One worker of the daemon: its name, and its own directory under the daemon's state dir."""
        state = None if self.state_dir is None else os.path.join(self.state_dir, "contexts", name)
        return dataclasses.replace(self, name=name, state_dir=state)

    def argv(self, python: str = sys.executable) -> list[str]:
        """The command line that starts this worker (unset options are left out)."""
        out = [python, "-m", WORKER_MODULE]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out += [_flag(f.name), str(value)]
        return out

    def env(self, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
        """What this worker needs set in its environment beyond ``environ`` (``CUDA_LLAMACPP_PRELOAD``)."""
        preload = environ.get("LD_PRELOAD", "")
        if self.backend != "llamacpp" or not self.device.startswith("cuda") or "libstdc++" in preload:
            return {}
        return {"LD_PRELOAD": f"{CUDA_LLAMACPP_PRELOAD} {preload}".strip()}

    @classmethod
    def parse(cls, argv: list[str] | None = None) -> WorkerSpec:
        return cls(**vars(parser().parse_args(argv)))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


HELP = {
    "backend": "engine: hf (local HuggingFace model), llamacpp (a GGUF through llama.cpp) "
    "or openai (an OpenAI-compatible endpoint)",
    "endpoint": "the daemon's worker endpoint",
    "name": "fixed routing id, so a reconnect is recognised",
    "model": "model directory (already converted), or the remote model's name",
    "slots": "requests run at once (a batch, or concurrent streams)",
    "heartbeat_s": "seconds between heartbeats",
    "credentials": "stdin: read the secret the daemon handed over as one JSON line on stdin (none: connect without)",
    "device": "torch device",
    "device_budget": "bytes of suspended KV kept in place",
    "host_budget": "bytes of KV swapped to host memory",
    "disk_budget": "bytes of KV in snapshot files",
    "snapshot_tier": "send every preempted context straight to this tier (tests, benchmarks)",
    "state_dir": "this worker's own directory for disk snapshots (none: no disk tier)",
    "prefill_chunk": "prompt tokens fed per step (chunked prefill)",
    "threads": "llama.cpp compute threads (0: every core)",
    "ctx_size": "llama.cpp: cells of the KV cache, split evenly between its sequence ids (0: 2048 per id)",
    "prefix_cache": "bytes of recent prompts' (llamacpp) and ended conversations' states kept for new prompts "
    "that start alike (0: off; -1: the smaller of 8 GiB and a quarter of the available memory)",
    "peer_endpoint": "where other workers push migrating contexts (auto: beside an ipc:// --endpoint; '': none)",
    "base_url": "the API's base URL, e.g. http://127.0.0.1:8000/v1",
    "api_key_env": "environment variable holding the API key (default: OPENAI_API_KEY)",
    "api_key_file": "file holding the API key",
    "tokenizer": "the remote model's tokenizer directory: token counts and completions resume",
    "api_timeout_s": "longest silence of the remote (connect <= 10 s)",
    "api_retries": "retries of a failed stream, with exponential backoff",
    "resume_method": "how preempted API requests resume (auto: detect once)",
}
CHOICES = {
    "credentials": ("none", "stdin"),
    "backend": BACKENDS,
    "dtype": DTYPES,
    "snapshot_tier": SNAPSHOT_TIERS,
    "resume_method": RESUME_METHODS,
}
REQUIRED = ("endpoint", "name", "model")


def parser() -> argparse.ArgumentParser:
    """The worker process's own flags, one per ``WorkerSpec`` field, with its default."""
    ap = argparse.ArgumentParser(prog="quantad-worker", description="quantad worker process (started by the daemon)")
    for f in dataclasses.fields(WorkerSpec):
        kind: Any = str if f.type in ("str", "str | None") else {"int": int, "float": float}[f.type]
        ap.add_argument(
            _flag(f.name),
            type=kind,
            default=f.default,
            required=f.name in REQUIRED,
            choices=CHOICES.get(f.name),
            help=HELP.get(f.name),
        )
    return ap

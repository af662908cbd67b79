"""A model's context length from its files, before any worker has loaded it (``/v1/models`` right after start).

The daemon never imports a backend, so it reads what it needs itself: a GGUF's header (its
``<architecture>.context_length``) or a directory's ``config.json`` (``max_position_embeddings``),
and predicts what the worker will report in its ``ready``: the HF engine takes the trained window,
the llama.cpp engine the smaller of it and each sequence id's cells (``ipc.worker_spec``).
The worker's own figure replaces it once reported.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import BinaryIO

from ipc.worker_spec import WorkerSpec, llama_seq_cells

log = logging.getLogger("quantad")

GGUF_MAGIC = b"GGUF"
# GGUF value types -> struct format of one scalar (8: string, 9: array are read apart)
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
MAX_KEYS = 100_000  # a header claiming more is not a model file


def _read(f: BinaryIO, fmt: str) -> int | float | bool:
    size = struct.calcsize(fmt)
    raw = f.read(size)
    if len(raw) != size:
        raise ValueError("the GGUF header ends early")
    return struct.unpack(fmt, raw)[0]


def _string(f: BinaryIO) -> str:
    n = int(_read(f, "<Q"))
    raw = f.read(n)
    if len(raw) != n:
        raise ValueError("the GGUF header ends early")
    return raw.decode("utf-8", "replace")


def _value(f: BinaryIO, kind: int) -> object:
    if kind in SCALARS:
        return _read(f, SCALARS[kind])
    if kind == 8:
        return _string(f)
    if kind == 9:
        inner, count = int(_read(f, "<I")), int(_read(f, "<Q"))
        if inner in SCALARS:  # skipped, not read: a vocabulary's scores are large
            f.seek(count * struct.calcsize(SCALARS[inner]), 1)
        else:
            for _ in range(count):
                _value(f, inner)
        return None
    raise ValueError(f"unknown GGUF value type {kind}")


def gguf_context(path: Path) -> int | None:
    """``<architecture>.context_length`` from a GGUF's header (None where it has none)."""
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ValueError("not a GGUF file")
        _read(f, "<I")  # version
        _read(f, "<Q")  # tensors
        keys = int(_read(f, "<Q"))
        if keys > MAX_KEYS:
            raise ValueError(f"a GGUF header with {keys} keys")
        arch, lengths = None, {}
        for _ in range(keys):
            key, kind = _string(f), int(_read(f, "<I"))
            value = _value(f, kind)
            if key == "general.architecture":
                arch = value
            elif key.endswith(".context_length"):
                lengths[key] = value
            if arch is not None and f"{arch}.context_length" in lengths:
                return int(lengths[f"{arch}.context_length"])
    return None


def trained_context(model: str) -> int | None:
    """The model's trained context window, from its GGUF or its directory's ``config.json``."""
    p = Path(model)
    if p.is_file():
        return gguf_context(p)
    config = p / "config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("max_position_embeddings")
        return value if isinstance(value, int) and value > 0 else None
    return None


def expected_context(spec: WorkerSpec) -> int:
    """What the workers of ``spec`` will report as their longest context (0: unknown until they do)."""
    if spec.backend not in ("hf", "llamacpp"):
        return 0
    try:
        trained = trained_context(spec.model)
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        log.warning("event=model_card_unread model=%s why=%r", spec.model, str(exc)[:200])
        return 0
    if spec.backend == "llamacpp":
        cells = llama_seq_cells(spec.slots, spec.ctx_size)
        return min(cells, trained) if trained else cells
    return trained or 0

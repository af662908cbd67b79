"""The disk tier's file format: one safetensors file per snapshot, checksummed, written atomically.

Files are data only (safetensors, never pickle).  A file may be truncated by a crash, corrupted
on disk or replaced behind our back, so ``read`` trusts nothing: size, format, layer count,
names, shapes, dtypes and a blake2b checksum of the tensor bytes must all match what was
written, or it raises ``CorruptSnapshot`` and the caller recomputes instead.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

FORMAT = "quantad-ctx"
VERSION = "1"
PREFIX, SUFFIX, TMP = "ctx-", ".safetensors", ".tmp"

log = logging.getLogger("quantad.contexts")

Layers = list[tuple[torch.Tensor, torch.Tensor]]


class CorruptSnapshot(Exception):
    """A snapshot file that cannot be trusted (missing, truncated, altered)."""


@dataclass
class DiskFile:
    """Where a disk-tier snapshot lives and what its file must contain."""

    path: str
    nbytes: int  # the file's size from os.stat after it was written
    digest: str  # blake2b of the tensor bytes, also stored in the file's metadata
    layout: dict[str, tuple[tuple[int, ...], torch.dtype]]  # name -> (shape, dtype), in checksum order


def path_for(state_dir: str, key: int) -> str:
    return os.path.join(state_dir, f"{PREFIX}{int(key)}{SUFFIX}")


def tensor_names(n_layers: int, has_logits: bool) -> list[str]:
    """Names in the fixed order the checksum covers them."""
    names = [f"{kv}.{i}" for i in range(n_layers) for kv in ("k", "v")]
    return names + (["logits"] if has_logits else [])


def checksum(tensors: list[torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=32)
    for t in tensors:
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def encode(layers: Layers, logits: torch.Tensor | None, tokens: int) -> tuple[bytes, DiskFile]:
    """The file's exact bytes, and its record (``path`` and ``nbytes`` filled in by the writer)."""
    flat = [t for kv in layers for t in kv] + ([logits] if logits is not None else [])
    names = tensor_names(len(layers), logits is not None)
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in zip(names, flat, strict=True)}
    digest = checksum(list(tensors.values()))
    meta = {"format": FORMAT, "version": VERSION, "layers": str(len(layers)), "tokens": str(tokens), "checksum": digest}
    layout = {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}
    return save(tensors, metadata=meta), DiskFile(path="", nbytes=0, digest=digest, layout=layout)


def write_atomic(path: str, data: bytes) -> int:
    """Temp file, fsync, rename, fsync the directory: a crash leaves the old state or the new, never half.

    Returns the size of the file as the filesystem reports it.
    """
    tmp = path + TMP
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return os.stat(path).st_size


def read(file: DiskFile) -> tuple[Layers, torch.Tensor | None]:
    """The tensors exactly as written, or ``CorruptSnapshot``."""
    names = list(file.layout)
    try:
        size = os.stat(file.path).st_size
        if size != file.nbytes:
            raise CorruptSnapshot(f"size {size} != {file.nbytes} written")
        # ``pread`` copies into memory we own: an mmap'd tensor would fault if the file changed later.
        with safe_open(file.path, framework="pt", backend="pread") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("version") != VERSION:
                raise CorruptSnapshot(f"not a {FORMAT} v{VERSION} file")
            n_layers = int(meta.get("layers", ""))
            if tensor_names(n_layers, "logits" in names) != names or set(f.keys()) != set(names):
                raise CorruptSnapshot("layers or tensor names differ from what was written")
            if meta.get("checksum") != file.digest:
                raise CorruptSnapshot("checksum in metadata differs from what was written")
            tensors = {n: f.get_tensor(n) for n in names}
    except (OSError, SafetensorError, ValueError, TypeError) as exc:
        raise CorruptSnapshot(f"{type(exc).__name__}: {exc}") from exc
    for n, (shape, dtype) in file.layout.items():
        if tuple(tensors[n].shape) != shape or tensors[n].dtype != dtype:
            raise CorruptSnapshot(f"{n}: {tuple(tensors[n].shape)} {tensors[n].dtype}, expected {shape} {dtype}")
    if checksum([tensors[n] for n in names]) != file.digest:
        raise CorruptSnapshot("checksum of the tensor bytes does not match")
    layers = [(tensors[f"k.{i}"], tensors[f"v.{i}"]) for i in range(n_layers)]
    return layers, tensors.get("logits")


def remove(path: str) -> None:
    """Delete a file; a failure is logged, never raised (the caller is cleaning up)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot remove %s: %s", path, exc)


def clean(state_dir: str) -> int:
    """Remove snapshot files left by an earlier process: nothing refers to them any more."""
    stale = glob.glob(os.path.join(glob.escape(state_dir), f"{PREFIX}*{SUFFIX}"))
    stale += glob.glob(os.path.join(glob.escape(state_dir), f"{PREFIX}*{SUFFIX}{TMP}"))
    for path in stale:
        remove(path)
    return len(stale)

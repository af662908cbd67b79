"""Tensors to raw frames and back, for moving a context between workers (no pickle)."""

from __future__ import annotations

import warnings

import torch

from ipc.tensor_frames import check

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}
_NAMES = {v: k for k, v in _DTYPES.items()}


def to_frames(tensors: list[torch.Tensor]) -> tuple[list[dict], list[memoryview]]:
    """Headers and zero-copy byte views (one host copy for device tensors)."""
    specs, frames = [], []
    for t in tensors:
        host = t.detach().to("cpu").contiguous()
        specs.append({"dtype": _NAMES[host.dtype], "shape": list(host.shape)})
        frames.append(memoryview(host.view(torch.uint8).reshape(-1).numpy()))
    return specs, frames


def from_frames(specs: list, frames: list, device: torch.device) -> list[torch.Tensor]:
    """Rebuild tensors after checking every header against its frame.

    On the CPU the tensors are views of the received frames (no copy: the tensor keeps its frame
    alive).  Frames are read-only; a context's KV is only ever read (a cache appends into tensors
    of its own: the batch's ``backends.growing.GrowingLayer`` that adopted a full tensor
    reallocates before its first append; joining a batch copies rows), so that is safe, and
    torch's warning is muted.
    """
    out = []
    for spec, frame in zip(check(specs, frames), frames, strict=True):
        buf = frame.buffer if hasattr(frame, "buffer") else frame
        dtype = _DTYPES[spec["dtype"]]
        if not len(buf):
            out.append(torch.empty(spec["shape"], dtype=dtype, device=device))
            continue
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            t = torch.frombuffer(buf, dtype=dtype)
        out.append(t.reshape(spec["shape"]).to(device))
    return out

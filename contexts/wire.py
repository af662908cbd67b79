"""Tensors to raw frames and back, for moving a context between workers (no pickle)."""

from __future__ import annotations

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
    """Rebuild tensors after checking every header against its frame."""
    out = []
    for spec, frame in zip(check(specs, frames), frames, strict=True):
        buf = frame.buffer if hasattr(frame, "buffer") else frame
        t = torch.frombuffer(bytearray(buf), dtype=_DTYPES[spec["dtype"]]) if len(buf) else torch.empty(0)
        out.append(t.to(_DTYPES[spec["dtype"]]).reshape(spec["shape"]).to(device))
    return out

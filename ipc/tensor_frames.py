"""Raw tensor frames: a dtype/shape header per frame, checked before anything is built.

The header travels inside the msgpack map (``tensors``: a list of {dtype, shape}); the
bytes travel as separate ZeroMQ frames sent with ``copy=False``.  No torch here: ``ipc``
only validates that each frame is exactly as long as its header says.
"""

from __future__ import annotations

from typing import Any

from ipc.protocol import E_BAD_FIELD, MAX_TENSOR_FRAME, ProtocolError

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4, "uint8": 1}
MAX_TENSORS = 4096
MAX_DIMS = 8


def _spec(i: int, spec: Any) -> tuple[dict[str, Any], int]:
    """One clean header and the byte count it announces."""
    if not isinstance(spec, dict) or spec.get("dtype") not in ITEMSIZE:
        raise ProtocolError(E_BAD_FIELD, f"tensors[{i}]: dtype must be one of {sorted(ITEMSIZE)}")
    shape = spec.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(type(n) is int and n >= 0 for n in shape):
        raise ProtocolError(E_BAD_FIELD, f"tensors[{i}]: shape must be a list of at most {MAX_DIMS} sizes")
    n = ITEMSIZE[spec["dtype"]]
    for d in shape:
        n *= d
    return {"dtype": spec["dtype"], "shape": shape}, n


def check(specs: Any, frames: list) -> list[dict[str, Any]]:
    """Validate headers against frames; return the clean specs."""
    if not isinstance(specs, list) or len(specs) > MAX_TENSORS or len(specs) != len(frames):
        raise ProtocolError(E_BAD_FIELD, f"'tensors' must list one header per frame ({len(frames)} frames)")
    clean = []
    for i, (spec, frame) in enumerate(zip(specs, frames, strict=True)):
        c, n = _spec(i, spec)
        size = len(frame.buffer) if hasattr(frame, "buffer") else len(frame)
        if n != size or size > MAX_TENSOR_FRAME:
            raise ProtocolError(E_BAD_FIELD, f"tensors[{i}]: header says {n} bytes, frame has {size}")
        clean.append(c)
    return clean


def spec_bytes(specs: Any) -> int:
    """The bytes a list of headers announces, for frames that travelled elsewhere (headers checked)."""
    if not isinstance(specs, list) or len(specs) > MAX_TENSORS:
        raise ProtocolError(E_BAD_FIELD, f"'tensors' must be a list of at most {MAX_TENSORS} headers")
    return sum(_spec(i, spec)[1] for i, spec in enumerate(specs))

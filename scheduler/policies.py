"""The policies by name: what ``--policy`` and ``--policy-opt`` build.

Apart from ``scheduler.policy`` so the base class never imports its own subclasses.
"""

from __future__ import annotations

import inspect
from typing import Any

from scheduler.fair import VirtualTokenCounter
from scheduler.mlfq import Mlfq
from scheduler.plas import Plas
from scheduler.policy import Fifo, Policy, Quantum, RoundRobin
from scheduler.srpt import ShortestRemaining

CLASSES: dict[str, type[Policy]] = {
    "rr": RoundRobin,
    "fifo": Fifo,
    "mlfq": Mlfq,
    "fair": VirtualTokenCounter,
    "plas": Plas,
    "srpt": ShortestRemaining,
}
POLICY_NAMES = tuple(CLASSES)


def policy_class(name: str) -> type[Policy]:
    try:
        return CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}") from None


def make_policy(name: str, quantum: Quantum, opts: dict[str, str] | None = None) -> Policy:
    """Build a policy by name; ``opts`` are KEY=VALUE strings, converted to the type of each default."""
    cls = policy_class(name)
    return cls(quantum, **_convert(cls, opts or {}))


def _convert(cls: type[Policy], opts: dict[str, str]) -> dict[str, Any]:
    defaults: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.default is not inspect.Parameter.empty and p.kind is p.POSITIONAL_OR_KEYWORD:
                defaults[p.name] = p.default
    out: dict[str, Any] = {}
    for key, text in opts.items():
        if key not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise ValueError(f"policy {cls.name!r} has no option {key!r} (options: {known})")
        kind = type(defaults[key])
        try:
            out[key] = kind(text)
        except ValueError:
            raise ValueError(f"policy option {key}={text!r} must be {kind.__name__}") from None
    return out

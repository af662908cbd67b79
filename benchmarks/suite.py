"""Benchmarks as parts of one run: flags, header, the daemons they need started once and shared, their tables.

A part is one benchmark module's entry (``throughput.PART``, ``sessions.PART``...): its name for ``--only``, its
settings at the default and the ``--quick`` sizes, the ``quantad serve`` daemons it needs (by name: parts that
name the same daemon with the same flags share it) and the function that measures and returns its tables.
``python -m benchmarks.batching`` runs four parts; each module's own ``main`` runs its part alone, the same way.
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from backends.hf_model import HFModel
from benchmarks.common import (
    Daemon,
    add_wait_quiet,
    cleanup_report,
    like_a_worker,
    load_engine,
    log,
    print_footer,
    print_header,
    print_part,
    serving,
)


@dataclass(frozen=True)
class Part:
    name: str  # what ``--only`` calls it
    default: Any  # its settings at the default sizes
    quick: Any  # and at the ``--quick`` sizes
    daemons: Callable[[Any], dict[str, list[str]]]  # settings -> {daemon name: ``quantad serve`` flags}
    run: Callable[[HFModel, dict[str, Daemon], Any], str]  # (engine, daemons, settings) -> its tables


def build_parser(prog: str, description: str, parts: Sequence[Part], quick_help: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=f"python -m {prog}", description=description)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    ap.add_argument("--model", default="smollm2", help="model (default: embedded SmolLM2-135M)")
    if len(parts) > 1:
        ap.add_argument(
            "--only", action="append", choices=[p.name for p in parts], help="run only this part (repeatable)"
        )
    add_wait_quiet(ap, "part")
    return ap


def daemon_specs(parts: Sequence[Part], settings: dict[str, Any]) -> dict[str, list[str]]:
    """The ``quantad serve`` flags of every daemon the parts need, each daemon once, in the order first named."""
    specs: dict[str, list[str]] = {}
    for part in parts:
        for name, flags in part.daemons(settings[part.name]).items():
            if specs.setdefault(name, flags) != flags:
                raise ValueError(f"daemon {name!r}: part {part.name!r} wants {flags}, another part {specs[name]}")
    return specs


def run_parts(engine: HFModel, model: str, parts: Sequence[Part], settings: dict[str, Any], wait_s: float) -> None:
    """The parts that need daemons, with all their daemons up at once; then the others, after the daemons stop."""
    if specs := daemon_specs(parts, settings):
        with serving(specs, model) as daemons:
            for part in parts:
                if part.daemons(settings[part.name]):
                    print_part(functools.partial(part.run, engine, daemons, settings[part.name]), wait_s)
        print(cleanup_report(daemons) + "\n", flush=True)
        left = [pid for d in daemons.values() for pid in d.left]
        if left:
            raise RuntimeError(f"worker processes {left} outlived their daemon's SIGTERM (killed them)")
    for part in parts:
        if not part.daemons(settings[part.name]):
            print_part(functools.partial(part.run, engine, {}, settings[part.name]), wait_s)


def main(
    prog: str, title: str, parts: Sequence[Part], argv: list[str] | None, description: str, quick_help: str
) -> int:
    """``python -m PROG [--quick] [--model M] [--only NAME]... [--wait-quiet S]``: run the chosen parts."""
    args = build_parser(prog, description, parts, quick_help).parse_args(argv)
    like_a_worker(prog)  # in-process switches with the workers' malloc settings
    only = getattr(args, "only", None) or [p.name for p in parts]
    chosen = [p for p in parts if p.name in only]
    settings = {p.name: p.quick if args.quick else p.default for p in chosen}
    t0 = time.perf_counter()
    print_header(f"{title} ({'quick' if args.quick else 'default'} sizes)", prog, argv, ", no GPU")
    engine = load_engine(args.model)
    run_parts(engine, args.model, chosen, settings, args.wait_quiet)
    print_footer(t0)
    log(f"all done in {time.perf_counter() - t0:.0f} s")
    return 0

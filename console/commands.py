"""The client commands of ``quantad``: run, ps, workers, top, kill, nice, demo, bench.

Each takes the parsed arguments and returns the exit code; ``console.cli`` turns a daemon that
does not answer (``TimeoutError``) and error replies (``ClientError``) into their exit codes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from console import views
from ipc import protocol as P
from ipc.client import Client, result_of


def cmd_run(args: argparse.Namespace) -> int:
    messages = read_messages(args) if args.attach is None else []
    with Client(args.endpoint, agent=args.agent) as c:
        c.ping()  # fail fast, with a clear message, when no daemon listens
        events = []
        params = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        if args.attach is not None:
            stream = c.attach(args.attach)
        else:
            stream = c.chat(messages, stream=True, stop=args.stop, session=args.session, nice=args.nice, **params)
        for ev in stream:
            events.append(ev)
            if ev.event == P.EV_TOKEN and not args.json:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
            elif args.events and ev.event in (P.EV_ACCEPTED, P.EV_PREEMPTED, P.EV_RESUMED):
                shown = {k: v for k, v in ev.data.items() if k not in ("v", "id")}
                print(f"\n[{ev.event} {json.dumps(shown)}]", file=sys.stderr)
        result = result_of(events)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print()
    return 0


def read_messages(args: argparse.Namespace) -> list[dict]:
    if args.messages:
        try:
            text = sys.stdin.read() if args.messages == "-" else Path(args.messages).read_text()
            messages = json.loads(text)
        except (OSError, json.JSONDecodeError) as exc:
            raise SystemExit(f"quantad: cannot read messages from {args.messages}: {exc}") from None
        if not isinstance(messages, list):
            raise SystemExit("quantad: --messages must hold a JSON list of {role, content} objects")
        if args.prompt:
            messages.append({"role": "user", "content": args.prompt})
    elif args.prompt:
        messages = [{"role": "user", "content": args.prompt}]
    else:
        raise SystemExit("quantad run: give a prompt or --messages FILE")
    if args.system:
        messages.insert(0, {"role": "system", "content": args.system})
    return messages


def cmd_ps(args: argparse.Namespace) -> int:
    with Client(args.endpoint) as c:
        data = c.ps()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print("\n".join(views.ps_table(data["requests"])))
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    with Client(args.endpoint) as c:
        data = c.workers()
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print("\n".join(views.workers_table(data["workers"])))
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    from console import top

    return top.run(args.endpoint, args.interval, once=args.once, as_json=args.json)


def cmd_kill(args: argparse.Namespace) -> int:
    with Client(args.endpoint) as c:
        c.kill(args.pid)
    print(f"killed {args.pid}")
    return 0


def cmd_nice(args: argparse.Namespace) -> int:
    with Client(args.endpoint) as c:
        data = c.nice(args.pid, args.nice)
    if args.json:
        print(json.dumps(data))
    else:
        print(f"{data['pid']}: old nice {data['old']}, new nice {data['nice']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from console.demo import run_demo

    return run_demo(args.model, args.quantum_tokens)


def cmd_bench(args: argparse.Namespace) -> int:
    """The harness lives in ``benchmarks.harness`` and is imported only here."""
    try:
        from benchmarks.harness.cli import bench_config
        from benchmarks.harness.runner import run
    except ImportError as exc:
        print(
            f"quantad bench: the benchmark harness is not installed ({exc}); run it from a source checkout "
            "with the 'bench' extra",
            file=sys.stderr,
        )
        return 2
    try:
        cfg = bench_config(args)
    except ValueError as exc:
        print(f"quantad bench: {exc}", file=sys.stderr)
        return 2
    result = run(cfg)
    print(Path(cfg.out, "results.md").read_text())
    failed = [p["label"] for p in result["points"] if p.get("error")]
    if failed:
        print(f"quantad bench: failed points: {', '.join(failed)} (see results.md and logs/)", file=sys.stderr)
        return 1
    return 0

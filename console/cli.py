"""The ``quantad`` command: serve, run, ps, top, workers, kill, nice, config, demo, bench, keygen, worker.

The console sits on top of every other package.  ``serve`` and ``config`` are the daemon's own
commands (``scheduler.launch``, the entry ``python -m scheduler serve`` runs); the client
commands live in ``console.commands``, the tables they print in ``console.views``.
"""

from __future__ import annotations

import argparse
import os
import sys

from console import commands, remote
from ipc.client import Cancelled, ClientError
from scheduler import launch
from scheduler.options import add_config_command, add_serve_command, command_parser, endpoint_arg, positive

DESCRIPTION = "Preemptive, OS-style scheduler daemon for LLM generation."
COMMANDS = {
    "run": commands.cmd_run,
    "ps": commands.cmd_ps,
    "kill": commands.cmd_kill,
    "nice": commands.cmd_nice,
    "demo": commands.cmd_demo,
    "bench": commands.cmd_bench,
    "top": commands.cmd_top,
    "workers": commands.cmd_workers,
    "keygen": remote.cmd_keygen,
    "worker": remote.cmd_worker,
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in launch.COMMANDS:
        return launch.main(argv)  # the daemon's own commands: the same parser, the same exit codes
    args = build_parser().parse_args(argv)
    for flag, var in (("curve_key", "QUANTAD_CURVE_KEY"), ("curve_server", "QUANTAD_CURVE_SERVER")):
        if getattr(args, flag, None):
            os.environ[var] = getattr(args, flag)  # what ipc.client reads
    try:
        return COMMANDS[args.cmd](args)
    except TimeoutError as exc:
        print(f"quantad: {exc} (is 'quantad serve' running?)", file=sys.stderr)
        return 3
    except Cancelled as exc:
        print(f"\nquantad: cancelled: {exc.message}", file=sys.stderr)
        return 4
    except ClientError as exc:
        print(f"quantad: error {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    ap, sub = command_parser(DESCRIPTION)
    add_serve_command(sub)
    _add_run(sub)
    _add_views(sub)
    _add_controls(sub)
    add_config_command(sub)
    d = sub.add_parser("demo", help="start a daemon, run concurrent requests, show them interleave")
    d.add_argument("--model", default="smollm2")
    d.add_argument("--quantum-tokens", type=positive(int), default=5)
    _add_bench(sub)
    remote.add_commands(sub)
    for name in ("run", "ps", "top", "workers", "kill", "nice"):
        _curve_client_args(sub.choices[name])
    return ap


def _curve_client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--curve-key", metavar="FILE", help="CURVE: this client's .key_secret (or $QUANTAD_CURVE_KEY)")
    p.add_argument("--curve-server", metavar="FILE", help="CURVE: the daemon's server.key (or $QUANTAD_CURVE_SERVER)")


def _add_run(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("run", help="submit one chat and stream its answer")
    endpoint_arg(r)
    r.add_argument("prompt", nargs="?", help="the user message (or use --messages)")
    r.add_argument("--messages", metavar="FILE", help="a JSON list of chat messages ('-' for stdin)")
    r.add_argument("--session", help="keep this conversation's context for the agent's next turn")
    r.add_argument("--system", help="an optional system message")
    r.add_argument("--max-tokens", type=positive(int), default=256)
    r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--seed", type=int)
    r.add_argument("--stop", action="append", help="stop string (repeatable)")
    r.add_argument("--agent", default="cli", help="agent name shown in ps")
    r.add_argument("--nice", type=int, help="nice value -20..19 as in Unix: lower runs first (default 0)")
    r.add_argument("--json", action="store_true", help="print the final result as one JSON object")
    r.add_argument("--events", action="store_true", help="print scheduling events (preempted/resumed) on stderr")
    r.add_argument(
        "--attach",
        type=int,
        metavar="PID",
        help="submit nothing: show request PID (yours; any, for an admin) from its start to its end, "
        "live or, for a while after it ended, from the daemon's journal",
    )


def _add_views(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ps", help="list requests like ps")
    endpoint_arg(p)
    p.add_argument("--json", action="store_true")

    t = sub.add_parser(
        "top",
        help="live view of requests, workers, queue, tokens/s and memory (q quits)",
        description="Redraws every --interval seconds; q quits. --once prints one screen and "
        "--json one snapshot (the stats, workers and ps answers) for scripts.",
    )
    endpoint_arg(t)
    t.add_argument(
        "--interval", type=positive(float), default=1.0, metavar="S", help="seconds between refreshes (default 1)"
    )
    t.add_argument("--once", action="store_true", help="print one screen and exit")
    t.add_argument("--json", action="store_true", help="print one snapshot as JSON and exit")

    w = sub.add_parser("workers", help="per worker: liveness, heartbeat age, slots, device, model, memory, restarts")
    endpoint_arg(w)
    w.add_argument("--json", action="store_true", help="print the answer as one JSON object")


def _add_controls(sub: argparse._SubParsersAction) -> None:
    k = sub.add_parser("kill", help="cancel a request by pid")
    endpoint_arg(k)
    k.add_argument("pid", type=int)

    n = sub.add_parser("nice", help="change the nice value (-20..19, lower runs first) of a live request")
    endpoint_arg(n)
    n.add_argument("pid", type=int)
    n.add_argument("nice", type=int, help="new nice value, -20..19")
    n.add_argument("--json", action="store_true", help="print the answer as one JSON object")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser(
        "bench",
        help="sweep quanta and policies over a workload; write results.json, results.md and plots",
        description="Start a daemon per (policy, quantum) point (or use --endpoint), drive a seeded workload "
        "with AsyncClient, and compare with FIFO and a transformers-serve peer. See benchmarks/README.md.",
    )
    _bench_sweep_flags(b)
    _bench_workload_flags(b)


def _bench_sweep_flags(b: argparse.ArgumentParser) -> None:
    b.add_argument("--quanta", default="25,100,400,1600,inf", help="quanta in ms, comma-separated; inf = FIFO")
    b.add_argument("--policies", default="fifo,rr", help="policy names passed to 'quantad serve --policy'")
    b.add_argument(
        "--workload",
        default="heavy-tail",
        choices=["heavy-tail", "agents", "uniform", "agents-chat"],
        help="agents-chat: agents resending their whole conversation each turn over the OpenAI HTTP front",
    )
    b.add_argument("--requests", type=positive(int), default=40, help="model calls in the workload")
    b.add_argument("--rate", type=positive(float), default=1.0, help="open-loop arrivals per second")
    b.add_argument(
        "--burstiness",
        type=positive(float),
        default=1.0,
        help="coefficient of variation of arrival gaps: 1 Poisson, >1 bursty (gamma process)",
    )
    b.add_argument("--model", default="smollm2", help="as for 'quantad serve --model' (the peer serves it too)")
    b.add_argument("--out", default="bench-results", help="directory for results.json, results.md, *.png, logs/")
    b.add_argument(
        "--endpoint",
        help="use this running daemon instead of starting one per point "
        "(one point: the daemon's own policy and quantum)",
    )
    b.add_argument("--seed", type=int, default=0, help="workload seed")
    b.add_argument("--slots", type=positive(int), default=4, help="'quantad serve --slots' of each point")
    b.add_argument("--workers", type=positive(int), default=1, help="'quantad serve --workers' of each point")
    b.add_argument(
        "--peer",
        nargs="?",
        const="transformers",
        default="transformers",
        metavar="NAMES",
        help="also run the workload against peers, comma-separated: 'transformers' "
        "('transformers serve --continuous-batching', the default; also plain --peer) and/or "
        "'llama-server' (llama.cpp's own server on the model's GGUF, same slots; 'make llama-server')",
    )
    b.add_argument("--no-peer", dest="peer", action="store_const", const="", help="no peer")


def _bench_workload_flags(b: argparse.ArgumentParser) -> None:
    b.add_argument(
        "--min-tokens",
        default="max",
        help="'max': min_tokens = max_tokens (exact lengths); 0: may stop early; N: at least N",
    )
    b.add_argument("--short-tokens", default="8,32", help="heavy-tail: output tokens of short requests, LO,HI")
    b.add_argument("--long-tokens", default="200,400", help="heavy-tail and greedy agents: long outputs, LO,HI")
    b.add_argument("--long-fraction", type=float, default=0.1, help="heavy-tail: share of long requests")
    b.add_argument("--uniform-tokens", default="16,128", help="uniform: output tokens, LO,HI")
    b.add_argument("--long-threshold", type=positive(int), default=100, help="output tokens from which a call is long")
    b.add_argument("--prompt-words", type=positive(int), default=40, help="median prompt length in words (lognormal)")
    b.add_argument("--agents", type=positive(int), default=4, help="agents (agents workload) or client ids")
    b.add_argument(
        "--greedy-agents", type=int, help="agents: greedy agents (half); agents-chat: long-answer ones (a quarter)"
    )
    b.add_argument("--preamble-words", type=positive(int), default=220, help="agents-chat: the shared system preamble")
    b.add_argument("--greedy-parallel", type=positive(int), default=2, help="concurrent loops per greedy agent")
    b.add_argument("--think-s", type=float, default=0.5, help="agents: mean think time of polite agents")
    b.add_argument("--tool-s", type=float, default=0.3, help="agents: mean tool wait after each call")
    b.add_argument("--temperature", type=float, default=0.0)
    b.add_argument("--warmup", type=int, default=1, help="untimed requests per server before each point")
    b.add_argument("--timeout-s", type=positive(float), default=1800.0, help="limit per point")
    b.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra 'quantad serve' flag per point (repeatable): --serve-arg=--prefill-chunk=8",
    )
    b.add_argument("--no-progress", action="store_true", help="no progress bars")


if __name__ == "__main__":
    sys.exit(main())

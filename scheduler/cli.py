"""The ``quantad`` command: serve, run, ps, top, workers, kill, nice, config, demo, bench."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

from ipc import protocol as P
from ipc.client import Cancelled, Client, ClientError, result_of
from ipc.endpoints import agent_endpoint, state_dir, worker_endpoint
from ipc.logfmt import FORMATS
from ipc.logfmt import setup as setup_logging
from scheduler import config as C
from scheduler import netaddr, views
from scheduler.policy import POLICY_NAMES

DEFAULT_QUANTUM_MS = 100.0


def _size(text: str) -> int:
    """Byte sizes like 512M, 4G, 1048576."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 512M, 4G)") from None


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value

    return parse


def _port(text: str) -> int:
    if not text.strip().isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return int(text)


def _endpoint_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoint",
        help="daemon's agent endpoint (ipc://PATH or tcp://HOST:PORT); "
        "default: $QUANTAD_ENDPOINT, else ipc://$XDG_RUNTIME_DIR/quantad/agents.sock",
    )


def _config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help=f"TOML config file (default: $QUANTAD_CONFIG, else "
                   f"{C.DEFAULT_FILE} when it exists)")  # fmt: skip


def serve_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``serve`` sub-parser, the one source of every configurable option."""
    parser = parser or build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="quantad", description="Preemptive, OS-style scheduler daemon for LLM generation."
    )
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser(
        "serve",
        help="run the scheduler daemon in the foreground",
        description="Every --some-flag is also the key some_flag of the TOML config file and the environment "
        "variable QUANTAD_SOME_FLAG; precedence: flag > environment > file > default.",
    )
    _config_arg(s)
    _endpoint_arg(s)
    s.add_argument("--worker-endpoint", help="endpoint workers connect to (default: derived from --endpoint)")
    s.add_argument("--model", help="model directory, .gguf file, or 'smollm2' (default, embedded); "
                   "with --backend openai, the remote model's name")  # fmt: skip
    s.add_argument("--quantum-ms", type=_positive(float),
                   help=f"time quantum in ms: the request's share of its worker's compute (a batched step "
                   f"charges each row 1/B of it; default {DEFAULT_QUANTUM_MS:g})")  # fmt: skip
    s.add_argument("--quantum-tokens", type=_positive(int), help="quantum in tokens (deterministic preemption points)")
    s.add_argument("--policy", default="rr", choices=POLICY_NAMES,
                   help="scheduling policy: rr, fifo (infinite quantum), mlfq (feedback queue with skip-join), "
                   "fair (virtual token counters across agents), plas (least attained service per program); "
                   "see docs/policies.md")  # fmt: skip
    s.add_argument("--policy-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a policy parameter, e.g. levels=6 for mlfq (repeatable; see docs/policies.md)")  # fmt: skip
    s.add_argument("--workers", type=_positive(int), default=1, help="worker processes to start")
    s.add_argument("--slots", type=_positive(int), default=1, help="requests each worker runs at once")
    s.add_argument("--device", default="cpu", help="torch device for workers (cpu, cuda, cuda:1)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--device-budget", type=_size, default="512M", help="suspended KV kept in place per worker")
    s.add_argument("--host-budget", type=_size, default="4G", help="KV swapped to host memory per worker")
    s.add_argument("--disk-budget", type=_size, default="8G", help="KV in safetensors files per worker (0: no disk)")
    s.add_argument("--state-dir", help="where disk snapshots go (default: $QUANTAD_STATE_DIR, else "
                   "$XDG_STATE_HOME/quantad, else ~/.local/state/quantad)")  # fmt: skip
    s.add_argument("--snapshot-tier", default="auto", choices=["auto", "device", "host", "disk", "recompute"],
                   help="auto: device, then host/disk/recompute under budget pressure; "
                   "else every preempted context goes straight to that tier (tests, benchmarks)")  # fmt: skip
    s.add_argument("--heartbeat-s", type=_positive(float), default=1.0, help="worker heartbeat period")
    s.add_argument("--liveness-s", type=_positive(float), default=30.0, help="silence after which a worker is dead")
    s.add_argument("--prefill-chunk", type=_positive(int), default=P.DEFAULT_PREFILL_CHUNK,
                   help="prompt tokens a worker feeds per step, so running requests keep streaming "
                   "(larger: prompts prefill in bigger batches, running rows wait longer)")  # fmt: skip
    s.add_argument("--max-restarts", type=int, default=5, help="restarts of a dying worker before giving up")
    s.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    s.add_argument("--log-format", default="kv", choices=list(FORMATS),
                   help="one line per event: key=value or JSON (journald: no timestamp, <N> priority)")  # fmt: skip
    s.add_argument("--grace-s", type=_positive(float), default=30.0,
                   help="SIGTERM/SIGINT: how long running requests may finish before they are cut")  # fmt: skip
    a = s.add_argument_group("API backend (--backend openai)")
    a.add_argument(
        "--backend",
        default="hf",
        choices=["hf", "openai"],
        help="hf: local HuggingFace workers; openai: workers streaming from an OpenAI-compatible API",
    )
    a.add_argument("--base-url", help="the API's base URL, e.g. http://127.0.0.1:8000/v1")
    a.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="environment variable holding the API key (default: OPENAI_API_KEY, else a dummy key for local servers)",
    )
    a.add_argument("--api-key-file", metavar="FILE", help="file holding the API key")
    a.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="the remote model's tokenizer: exact token counts, and "
        "resuming through /v1/completions with the chat template rendered locally",
    )
    a.add_argument(
        "--api-timeout-s",
        type=_positive(float),
        default=60.0,
        help="longest silence of the API before a stream fails (connect: at most 10 s)",
    )
    a.add_argument("--api-retries", type=int, default=4, help="retries of a failed stream (exponential backoff)")
    a.add_argument("--resume-method", default="auto", choices=["auto", "prefix", "completions", "none"],
                   help="how preempted API requests resume; auto: detect once per endpoint")  # fmt: skip
    h = s.add_argument_group("HTTP listeners (both off by default)")
    h.add_argument("--http", type=netaddr.host_port, metavar="HOST:PORT",
                   help="serve an OpenAI-compatible API (/v1/chat/completions, /v1/models, /health) on HOST:PORT; "
                   "loopback only unless --http-allow-remote; port 0 picks a free port")  # fmt: skip
    h.add_argument("--http-allow-remote", action="store_true",
                   help="let --http listen on a non-loopback address (set a token too)")  # fmt: skip
    h.add_argument("--http-token-file", metavar="FILE",
                   help="file holding the bearer token that /v1/* requests must send")  # fmt: skip
    h.add_argument("--http-token-env", metavar="VAR", help="environment variable holding that token")
    h.add_argument("--metrics-port", type=_port, metavar="PORT",
                   help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics (0: a free port)")  # fmt: skip

    r = sub.add_parser("run", help="submit one chat and stream its answer")
    _endpoint_arg(r)
    r.add_argument("prompt", nargs="?", help="the user message (or use --messages)")
    r.add_argument("--messages", metavar="FILE", help="a JSON list of chat messages ('-' for stdin)")
    r.add_argument("--session", help="keep this conversation's context for the agent's next turn")
    r.add_argument("--system", help="an optional system message")
    r.add_argument("--max-tokens", type=_positive(int), default=256)
    r.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--seed", type=int)
    r.add_argument("--stop", action="append", help="stop string (repeatable)")
    r.add_argument("--agent", default="cli", help="agent name shown in ps")
    r.add_argument("--nice", type=int, help="priority -20..19 as in Unix: lower runs first (default 0)")
    r.add_argument("--json", action="store_true", help="print the final result as one JSON object")
    r.add_argument("--events", action="store_true", help="print scheduling events (preempted/resumed) on stderr")

    p = sub.add_parser("ps", help="list requests like ps")
    _endpoint_arg(p)
    p.add_argument("--json", action="store_true")

    t = sub.add_parser("top", help="live view of requests, workers, queue, tokens/s and memory (q quits)",
                       description="Redraws every --interval seconds; q quits. --once prints one screen and "
                       "--json one snapshot (the stats, workers and ps answers) for scripts.")  # fmt: skip
    _endpoint_arg(t)
    t.add_argument("--interval", type=_positive(float), default=1.0, metavar="S",
                   help="seconds between refreshes (default 1)")  # fmt: skip
    t.add_argument("--once", action="store_true", help="print one screen and exit")
    t.add_argument("--json", action="store_true", help="print one snapshot as JSON and exit")

    w = sub.add_parser("workers", help="per worker: liveness, heartbeat age, slots, device, model, memory, restarts")
    _endpoint_arg(w)
    w.add_argument("--json", action="store_true", help="print the answer as one JSON object")

    k = sub.add_parser("kill", help="cancel a request by pid")
    _endpoint_arg(k)
    k.add_argument("pid", type=int)

    n = sub.add_parser("nice", help="change the nice value (-20..19, lower runs first) of a live request")
    _endpoint_arg(n)
    n.add_argument("pid", type=int)
    n.add_argument("nice", type=int, help="new nice value, -20..19")
    n.add_argument("--json", action="store_true", help="print the answer as one JSON object")

    c = sub.add_parser("config", help="check the configuration, or show the effective values and their sources")
    csub = c.add_subparsers(dest="config_cmd", required=True, metavar="ACTION")
    check = csub.add_parser("check", help="validate the config file and QUANTAD_* variables (exit 0 or 1)")
    _config_arg(check)
    shown = csub.add_parser("show", help="effective serve options and where each came from")
    _config_arg(shown)
    shown.add_argument("--json", action="store_true")

    d = sub.add_parser("demo", help="start a daemon, run concurrent requests, show them interleave")
    d.add_argument("--model", default="smollm2")
    d.add_argument("--quantum-tokens", type=_positive(int), default=5)
    _bench_parser(sub)
    return ap


def _bench_parser(sub) -> None:
    b = sub.add_parser(
        "bench",
        help="sweep quanta and policies over a workload; write results.json, results.md and plots",
        description="Start a daemon per (policy, quantum) point (or use --endpoint), drive a seeded workload "
        "with AsyncClient, and compare with FIFO and a transformers-serve peer. See benchmarks/README.md.",
    )
    b.add_argument("--quanta", default="25,100,400,1600,inf", help="quanta in ms, comma-separated; inf = FIFO")
    b.add_argument("--policies", default="fifo,rr", help="policy names passed to 'quantad serve --policy'")
    b.add_argument("--workload", default="heavy-tail", choices=["heavy-tail", "agents", "uniform"])
    b.add_argument("--requests", type=_positive(int), default=40, help="model calls in the workload")
    b.add_argument("--rate", type=_positive(float), default=1.0, help="open-loop arrivals per second")
    b.add_argument("--burstiness", type=_positive(float), default=1.0,
                   help="coefficient of variation of arrival gaps: 1 Poisson, >1 bursty (gamma process)")  # fmt: skip
    b.add_argument("--model", default="smollm2", help="as for 'quantad serve --model' (the peer serves it too)")
    b.add_argument("--out", default="bench-results", help="directory for results.json, results.md, *.png, logs/")
    b.add_argument("--endpoint", help="use this running daemon instead of starting one per point "
                   "(one point: the daemon's own policy and quantum)")  # fmt: skip
    b.add_argument("--seed", type=int, default=0, help="workload seed")
    b.add_argument("--slots", type=_positive(int), default=4, help="'quantad serve --slots' of each point")
    b.add_argument("--workers", type=_positive(int), default=1, help="'quantad serve --workers' of each point")
    b.add_argument("--peer", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the workload against 'transformers serve --continuous-batching'")  # fmt: skip
    b.add_argument("--min-tokens", default="max",
                   help="'max': min_tokens = max_tokens (exact lengths); 0: may stop early; N: at least N")  # fmt: skip
    b.add_argument("--short-tokens", default="8,32", help="heavy-tail: output tokens of short requests, LO,HI")
    b.add_argument("--long-tokens", default="200,400", help="heavy-tail and greedy agents: long outputs, LO,HI")
    b.add_argument("--long-fraction", type=float, default=0.1, help="heavy-tail: share of long requests")
    b.add_argument("--uniform-tokens", default="16,128", help="uniform: output tokens, LO,HI")
    b.add_argument("--long-threshold", type=_positive(int), default=100, help="output tokens from which a call is long")
    b.add_argument("--prompt-words", type=_positive(int), default=40, help="median prompt length in words (lognormal)")
    b.add_argument("--agents", type=_positive(int), default=4, help="agents (agents workload) or client ids")
    b.add_argument("--greedy-agents", type=int, help="agents workload: greedy agents (default: half)")
    b.add_argument("--greedy-parallel", type=_positive(int), default=2, help="concurrent loops per greedy agent")
    b.add_argument("--think-s", type=float, default=0.5, help="agents: mean think time of polite agents")
    b.add_argument("--tool-s", type=float, default=0.3, help="agents: mean tool wait after each call")
    b.add_argument("--temperature", type=float, default=0.0)
    b.add_argument("--warmup", type=int, default=1, help="untimed requests per server before each point")
    b.add_argument("--timeout-s", type=_positive(float), default=1800.0, help="limit per point")
    b.add_argument("--serve-arg", action="append", default=[], metavar="FLAG",
                   help="extra 'quantad serve' flag per point (repeatable): --serve-arg=--prefill-chunk=8")  # fmt: skip
    b.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        sp = serve_parser(parser)
        given = C.given_flags(sp, argv[argv.index("serve") + 1 :])
        try:
            args = effective_options(sp, given, args.config)
        except C.ConfigError as exc:
            print("quantad serve: bad configuration:\n  " + "\n  ".join(exc.problems), file=sys.stderr)
            return 2
    commands = {"serve": cmd_serve, "run": cmd_run, "ps": cmd_ps, "kill": cmd_kill, "nice": cmd_nice,
                "demo": cmd_demo, "bench": cmd_bench, "config": cmd_config, "top": cmd_top,
                "workers": cmd_workers}  # fmt: skip
    try:
        return commands[args.cmd](args)
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


# ---- configuration ------------------------------------------------------------------------
def effective_options(sp: argparse.ArgumentParser, given: argparse.Namespace, config: str | None) -> argparse.Namespace:
    """Flags over environment over file over defaults; the result also carries how to re-read it (SIGHUP)."""
    path = C.config_path(config)
    eff = C.resolve(sp, given, path)
    ns = argparse.Namespace(**vars(eff.values), cmd="serve", config=str(path) if path else None)
    ns.effective = eff
    ns.reload_options = lambda: C.resolve(sp, given, path)
    return ns


def cmd_config(args: argparse.Namespace) -> int:
    path = C.config_path(args.config)
    try:
        eff = C.resolve(serve_parser(), argparse.Namespace(), path)
    except C.ConfigError as exc:
        print("quantad config: invalid:\n  " + "\n  ".join(exc.problems), file=sys.stderr)
        return 1
    if args.config_cmd == "show":
        print(C.show(eff, args.json))
    else:
        from_file = sum(src.startswith("file:") for src in eff.sources.values())
        from_env = sum(src.startswith("env:") for src in eff.sources.values())
        print(f"quantad config: OK ({path or 'no config file'}: {from_file} keys set; {from_env} from QUANTAD_*)")
    return 0


def policy_from(ns: argparse.Namespace):
    """The policy named by the options; a time quantum of 100 ms unless a quantum is given."""
    from scheduler.policy import Quantum, make_policy

    ms = ns.quantum_ms if ns.quantum_ms or ns.quantum_tokens else DEFAULT_QUANTUM_MS
    if ms is not None and math.isinf(ms):  # --quantum-ms inf: no time limit (rr then runs as FIFO)
        ms = None
    return make_policy(ns.policy, Quantum(tokens=ns.quantum_tokens, ms=ms), policy_opts(ns.policy_opt))


# ---- serve --------------------------------------------------------------------------------
def resolve_model(model: str) -> str:
    """Convert/locate the model in a child process (the daemon never imports torch)."""
    out = subprocess.run(
        [sys.executable, "-m", "backends.model_store", model], stdout=subprocess.PIPE, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"quantad: cannot load model {model!r} (see above)")
    return out.stdout.strip().splitlines()[-1]


def prepare_ipc_dir(endpoint: str) -> None:
    if endpoint.startswith("ipc://"):
        d = Path(endpoint[len("ipc://") :]).parent
        d.mkdir(mode=0o750, parents=True, exist_ok=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from scheduler.daemon import DaemonConfig, serve

    setup_logging(args.log_level, args.log_format)
    if args.config:
        logging.getLogger("quantad").info("event=config file=%s", args.config)
    endpoint = agent_endpoint(args.endpoint, client=False)
    wep = args.worker_endpoint or worker_endpoint(endpoint)
    for ep in (endpoint, wep):
        prepare_ipc_dir(ep)
    try:
        policy = policy_from(args)
        http, token = http_options(args)
    except ValueError as exc:
        print(f"quantad serve: {exc}", file=sys.stderr)
        return 2
    if args.backend == "openai":
        model, worker_args = args.model, api_worker_args(args)
        name, aliases = model, ()
    else:
        model, worker_args = resolve_model(args.model or "smollm2"), ["--snapshot-tier", args.snapshot_tier]
        name, aliases = Path(model).name, (args.model or "smollm2", model)
    cfg = DaemonConfig(
        endpoint=endpoint,
        worker_endpoint=wep,
        model_dir=model,
        backend=args.backend,
        policy=policy,
        workers=args.workers,
        slots=args.slots,
        device=args.device,
        dtype=args.dtype,
        device_budget=args.device_budget,
        host_budget=args.host_budget,
        heartbeat_s=args.heartbeat_s,
        liveness_s=args.liveness_s,
        max_restarts=args.max_restarts,
        prefill_chunk=args.prefill_chunk,
        disk_budget=args.disk_budget,
        worker_args=worker_args,
        state_dir=(args.state_dir or str(state_dir())) if args.disk_budget > 0 else None,
        grace_s=args.grace_s,
        log_format=args.log_format,
        options=getattr(args, "effective", None),
        reload_options=getattr(args, "reload_options", None),
        build_policy=policy_from,
        model_name=name,
        model_aliases=aliases,
        http=http,
        http_token=token,
        metrics_port=args.metrics_port,
    )
    return serve(cfg)


def http_options(args: argparse.Namespace) -> tuple[tuple[str, int] | None, str | None]:
    """Where the HTTP front listens and its token; a non-loopback address needs --http-allow-remote."""
    token = None
    if args.http_token_file:
        try:
            token = Path(args.http_token_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read --http-token-file {args.http_token_file}: {exc.strerror}") from None
    elif args.http_token_env:
        token = os.environ.get(args.http_token_env, "").strip()
    if token == "":
        raise ValueError("the HTTP bearer token is empty (--http-token-file / --http-token-env)")
    if not args.http:
        return None, token
    host, port = netaddr.split(args.http)
    if not netaddr.is_loopback(host):
        if not args.http_allow_remote:
            raise ValueError(f"--http {args.http} is not a loopback address; pass --http-allow-remote to listen "
                             "there (with --http-token-file)")  # fmt: skip
        if token is None:
            logging.getLogger("quantad").warning("event=http_remote_without_token address=%s", args.http)
    return (host, port), token


def policy_opts(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--policy-opt wants KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def api_worker_args(args: argparse.Namespace) -> list[str]:
    """The API workers' flags.  The key itself never goes on a command line, only where to find it."""
    if not args.base_url or not args.model:
        raise SystemExit("quantad serve: --backend openai needs --base-url URL and --model NAME")
    if args.api_key_file and not Path(args.api_key_file).is_file():
        raise SystemExit(f"quantad serve: no API key file {args.api_key_file}")
    out = ["--base-url", args.base_url, "--api-timeout-s", str(args.api_timeout_s),
           "--api-retries", str(args.api_retries), "--resume-method", args.resume_method]  # fmt: skip
    for flag, value in (("--api-key-env", args.api_key_env), ("--api-key-file", args.api_key_file),
                        ("--tokenizer", args.tokenizer)):  # fmt: skip
        if value:
            out += [flag, str(Path(value).resolve()) if flag != "--api-key-env" else value]
    return out


# ---- clients ------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    messages = read_messages(args)
    with Client(args.endpoint, agent=args.agent) as c:
        c.ping()  # fail fast, with a clear message, when no daemon listens
        events = []
        for ev in c.chat(messages, stream=True, max_tokens=args.max_tokens, temperature=args.temperature,
                         top_p=args.top_p, seed=args.seed, stop=args.stop, session=args.session,
                         nice=args.nice):  # fmt: skip
            events.append(ev)
            if ev.event == P.EV_TOKEN and not args.json:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
            elif args.events and ev.event in (P.EV_ACCEPTED, P.EV_PREEMPTED, P.EV_RESUMED):
                print(f"\n[{ev.event} {json.dumps({k: v for k, v in ev.data.items() if k not in ('v', 'id')})}]",
                      file=sys.stderr)  # fmt: skip
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
    from scheduler import top

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
        print(f"{data['pid']}: old priority {data['old']}, new priority {data['nice']}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from scheduler.demo import run_demo

    return run_demo(args.model, args.quantum_tokens)


def cmd_bench(args: argparse.Namespace) -> int:
    """The harness lives in ``benchmarks.harness`` and is imported only here."""
    try:
        from benchmarks.harness.cli import bench_config
        from benchmarks.harness.runner import run
    except ImportError as exc:
        print(f"quantad bench: the benchmark harness is not installed ({exc}); run it from a source checkout "
              "with the 'bench' extra", file=sys.stderr)  # fmt: skip
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


if __name__ == "__main__":
    sys.exit(main())

"""The options of ``quantad serve``: its flags (the one source of every setting) and what they mean.

The ``serve`` and ``config`` sub-parsers are built here, for the daemon's own entry
(``scheduler.launch``) and for the ``quantad`` console, which adds its client commands around
them.  ``effective_options`` layers flags over environment over file over defaults
(``scheduler.config``); ``policy_from`` turns the result into a scheduling policy.
"""

from __future__ import annotations

import argparse
import math

from ipc.logfmt import FORMATS
from ipc.protocol import NICE_MAX, NICE_MIN
from ipc.worker_spec import BACKENDS, DTYPES, RESUME_METHODS, SNAPSHOT_TIERS, WorkerSpec
from scheduler import config as C
from scheduler import netaddr
from scheduler.policies import POLICY_NAMES
from scheduler.response_store import DEFAULT_KEEP_S, DEFAULT_MAX_PER_IDENTITY

W = WorkerSpec()  # every worker option's default, written once (ipc.worker_spec)

PROG = "quantad"
SERVE_HELP = "run the scheduler daemon in the foreground"
SERVE_DESCRIPTION = (
    "Every --some-flag is also the key some_flag of the TOML config file and the environment "
    "variable QUANTAD_SOME_FLAG; precedence: flag > environment > file > default."
)


# ---- argument types ---------------------------------------------------------------------
def size(text: str) -> int:
    """Byte sizes like 512M, 4G, 1048576."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 512M, 4G)") from None


def cache_size(text: str) -> int:
    """A byte size, or ``auto`` (-1: the worker sizes it from the memory it finds)."""
    return -1 if text.strip().lower() == "auto" else size(text)


def positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value

    return parse


def objective_entry(text: str) -> str:
    """``NAME=NICE``: an inference objective's name and the nice its requests run at."""
    name, sep, nice = text.rpartition("=")
    if not sep or not name.strip() or not nice.strip().lstrip("-").isdigit() or not NICE_MIN <= int(nice) <= NICE_MAX:
        raise argparse.ArgumentTypeError(f"expected NAME=NICE with NICE in {NICE_MIN}..{NICE_MAX}, got {text!r}")
    return f"{name.strip()}={int(nice)}"


def port(text: str) -> int:
    if not text.strip().isdigit() or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}")
    return int(text)


def endpoint_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoint",
        help="daemon's agent endpoint (ipc://PATH or tcp://HOST:PORT); "
        "default: $QUANTAD_ENDPOINT, else ipc://$XDG_RUNTIME_DIR/quantad/agents.sock",
    )


def config_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        metavar="FILE",
        help=f"TOML config file (default: $QUANTAD_CONFIG, else {C.DEFAULT_FILE} when it exists)",
    )


# ---- the serve and config commands ------------------------------------------------------------
def add_serve_command(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """``serve`` with every option of the daemon, in the order ``--help`` shows them."""
    s = sub.add_parser("serve", help=SERVE_HELP, description=SERVE_DESCRIPTION)
    config_arg(s)
    endpoint_arg(s)
    _scheduling_flags(s)
    _worker_flags(s)
    _stop_flags(s)
    _api_flags(s.add_argument_group("API backend (--backend openai)"))
    _http_flags(s.add_argument_group("HTTP listeners (both off by default)"))
    _security_flags(s.add_argument_group("security (docs/service.md)"))
    return s


def _security_flags(g: argparse._ArgumentGroup) -> None:
    from scheduler.limits import Limits

    lim = Limits()
    g.add_argument(
        "--requests-per-identity",
        type=positive(int),
        metavar="N",
        help=f"live requests (queued + running) one identity may have; more: quota_exceeded "
        f"(default {lim.requests_per_identity}; admins are not held to it)",
    )
    g.add_argument(
        "--tokens-per-identity",
        type=positive(int),
        metavar="N",
        help=f"estimated prompt + max_tokens over one identity's live requests; more: quota_exceeded "
        f"(default {lim.tokens_per_identity})",
    )
    g.add_argument(
        "--rate-limit",
        type=positive(float),
        metavar="PER_S",
        help=f"messages per second one connection may send, sustained; more: rate_limited "
        f"(default {lim.messages_per_s:g})",
    )
    g.add_argument(
        "--rate-burst",
        type=positive(int),
        metavar="N",
        help=f"messages one connection may send at once (default {lim.burst})",
    )
    g.add_argument(
        "--max-connections",
        type=positive(int),
        metavar="N",
        help=f"agent connections at once; more are refused at the handshake (default {lim.max_connections})",
    )
    g.add_argument(
        "--max-unread",
        type=positive(int),
        metavar="N",
        help=f"replies buffered for a connection that does not read them; then its requests are "
        f"cancelled (default {lim.max_unread})",
    )
    g.add_argument(
        "--curve-dir",
        metavar="DIR",
        help="CURVE keys ('quantad keygen'): DIR/server.key_secret is the daemon's pair; agents may connect "
        "with keys in DIR/clients/ (admins: DIR/admins/), remote workers with DIR/workers/NAME.key; "
        "every tcp:// endpoint then requires CURVE",
    )
    g.add_argument(
        "--allow-plaintext",
        action="store_true",
        help="let a tcp:// endpoint on a non-loopback address run without CURVE (anyone who reaches it may submit)",
    )


def add_config_command(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    c = sub.add_parser("config", help="check the configuration, or show the effective values and their sources")
    csub = c.add_subparsers(dest="config_cmd", required=True, metavar="ACTION")
    check = csub.add_parser("check", help="validate the config file and QUANTAD_* variables (exit 0 or 1)")
    config_arg(check)
    shown = csub.add_parser("show", help="effective serve options and where each came from")
    config_arg(shown)
    shown.add_argument("--json", action="store_true")
    return c


def command_parser(description: str | None = None) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """The ``quantad`` parser with no commands yet (the daemon's entry adds two, the console all)."""
    ap = argparse.ArgumentParser(prog=PROG, description=description)
    return ap, ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")


def serve_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``serve`` sub-parser (of ``parser``, else a new one), the one source of every configurable option."""
    if parser is None:
        _, sub = command_parser()
        return add_serve_command(sub)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def _scheduling_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--worker-endpoint", help="endpoint workers connect to (default: derived from --endpoint)")
    s.add_argument(
        "--model",
        help="model directory, .gguf file, or 'smollm2' (default, embedded); "
        "with --backend openai, the remote model's name",
    )
    s.add_argument(
        "--quantum-ms",
        type=positive(float),
        help=f"time quantum in ms: the request's share of its worker's compute (a batched step "
        f"charges each row 1/B of it; default {C.DEFAULT_QUANTUM_MS:g})",
    )
    s.add_argument("--quantum-tokens", type=positive(int), help="quantum in tokens (deterministic preemption points)")
    s.add_argument(
        "--policy",
        default="rr",
        choices=POLICY_NAMES,
        help="scheduling policy: rr, fifo (infinite quantum), mlfq (feedback queue with skip-join), "
        "fair (virtual token counters across agents), plas (least attained service per program), "
        "srpt (fewest tokens left to generate first, by max_tokens); "
        "see docs/policies.md",
    )
    s.add_argument(
        "--policy-opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a policy parameter, e.g. levels=6 for mlfq (repeatable; see docs/policies.md)",
    )


def _worker_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--workers", type=positive(int), default=1, help="worker processes to start")
    s.add_argument("--slots", type=positive(int), default=W.slots, help="requests each worker runs at once")
    s.add_argument("--device", default=W.device, help="device: cpu, cuda, cuda:1 (llamacpp: offloads all layers)")
    s.add_argument("--dtype", default=W.dtype, choices=DTYPES)
    s.add_argument("--device-budget", type=size, default=W.device_budget, help="suspended KV kept in place per worker")
    s.add_argument("--host-budget", type=size, default=W.host_budget, help="KV swapped to host memory per worker")
    s.add_argument(
        "--disk-budget", type=size, default=W.disk_budget, help="KV in safetensors files per worker (0: no disk)"
    )
    s.add_argument(
        "--state-dir",
        help="where disk snapshots go (default: $QUANTAD_STATE_DIR, else "
        "$XDG_STATE_HOME/quantad, else ~/.local/state/quantad)",
    )
    s.add_argument(
        "--snapshot-tier",
        default=W.snapshot_tier,
        choices=SNAPSHOT_TIERS,
        help="auto: device, then host/disk/recompute under budget pressure; "
        "else every preempted context goes straight to that tier (tests, benchmarks)",
    )
    s.add_argument("--heartbeat-s", type=positive(float), default=W.heartbeat_s, help="worker heartbeat period")
    s.add_argument("--liveness-s", type=positive(float), default=30.0, help="silence after which a worker is dead")
    s.add_argument(
        "--prefill-chunk",
        type=positive(int),
        default=W.prefill_chunk,
        help="prompt tokens a worker feeds per step, so running requests keep streaming "
        "(larger: prompts prefill in bigger batches, running rows wait longer; "
        "with no row decoding, a llamacpp step takes a whole batch: 2048 tokens or more)",
    )
    s.add_argument(
        "--threads", type=int, default=W.threads, help="--backend llamacpp: compute threads per worker (0: every core)"
    )
    s.add_argument(
        "--cache-ram",
        type=cache_size,
        default="auto",
        help="states kept per worker for prompts that start like an earlier one: every ended request's "
        "whole conversation (prompt and answer), and on llamacpp every prompt (the chat template's system "
        "turn, an agent's instructions), per identity, LRU; the next turn prefills only what is new "
        "(auto: the smaller of 8G and a quarter of the available memory, as llama-server's --cache-ram; 0: off)",
    )
    s.add_argument("--prefix-cache", type=cache_size, default=None, help="the older name of --cache-ram (wins if set)")
    s.add_argument(
        "--ctx-size",
        type=int,
        default=W.ctx_size,
        help="--backend llamacpp: cells of each worker's KV cache, split evenly between its sequence ids "
        "(slots + max(2, slots/2) of them; 0: 2048 per id); a request's context is one id's share",
    )
    s.add_argument("--max-restarts", type=int, default=5, help="restarts of a dying worker before giving up")
    s.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    s.add_argument(
        "--log-format",
        default="kv",
        choices=list(FORMATS),
        help="one line per event: key=value or JSON (journald: no timestamp, <N> priority)",
    )


def _stop_flags(s: argparse.ArgumentParser) -> None:
    """How the daemon stops, and what it keeps so that a stop (or a crash) loses nothing."""
    s.add_argument(
        "--grace-s",
        type=positive(float),
        default=30.0,
        help="SIGTERM/SIGINT: how long running requests may finish before they are cut",
    )
    s.add_argument(
        "--on-stop",
        default="drain",
        choices=["drain", "handover"],
        help="SIGTERM/SIGINT: drain (running requests finish within --grace-s; what is cut stays in the journal) "
        "or handover (every live request stays in the journal at once, for the next daemon to finish)",
    )
    s.add_argument(
        "--no-journal",
        dest="journal",
        action="store_false",
        help="keep no journal.  By default accepted requests and their output are kept in STATE_DIR/journal.db "
        "(SQLite), so a daemon that dies loses none: the next one on the state directory finishes them",
    )
    s.add_argument(
        "--journal-keep-s",
        type=float,
        default=300.0,
        help="how long an ended request stays in the journal, for clients that resume and `quantad run --attach`",
    )
    s.add_argument(
        "--responses-keep-s",
        type=positive(float),
        default=DEFAULT_KEEP_S,
        help="how long a stored response (the HTTP front's /v1/responses with store, the default) is kept "
        "in the journal's database, for GET, previous_response_id and background streams (default: 30 days)",
    )
    s.add_argument(
        "--max-stored-responses",
        type=positive(int),
        default=DEFAULT_MAX_PER_IDENTITY,
        help="stored responses kept per identity; past it a new one replaces the identity's oldest finished one",
    )


def _api_flags(a: argparse._ArgumentGroup) -> None:
    a.add_argument(
        "--backend",
        default="auto",
        choices=("auto", *BACKENDS),
        help="auto (default): llamacpp for a GGUF (the embedded default model included) when llama.cpp is "
        "installed ('make llama-server'), else hf; "
        "hf: local HuggingFace workers (safetensors, or a GGUF converted once; CUDA through torch); "
        "llamacpp: a GGUF run by llama.cpp in each worker (quantized weights, llama.cpp's kernels); "
        "openai: workers streaming from an OpenAI-compatible API",
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
        type=positive(float),
        default=W.api_timeout_s,
        help="longest silence of the API before a stream fails (connect: at most 10 s)",
    )
    a.add_argument(
        "--api-retries", type=int, default=W.api_retries, help="retries of a failed stream (exponential backoff)"
    )
    a.add_argument(
        "--resume-method",
        default=W.resume_method,
        choices=RESUME_METHODS,
        help="how preempted API requests resume; auto: detect once per endpoint",
    )


def _http_flags(h: argparse._ArgumentGroup) -> None:
    h.add_argument(
        "--http",
        type=netaddr.host_port,
        metavar="HOST:PORT",
        help="serve an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models, /tokenize, "
        "/detokenize, /health) on HOST:PORT; "
        "loopback only unless --http-allow-remote; port 0 picks a free port",
    )
    h.add_argument(
        "--http-allow-remote",
        action="store_true",
        help="let --http listen on a non-loopback address (set a token too)",
    )
    h.add_argument(
        "--http-token-file",
        metavar="FILE",
        help="file holding the bearer token that /v1/* requests must send",
    )
    h.add_argument("--http-token-env", metavar="VAR", help="environment variable holding that token")
    h.add_argument(
        "--objective-nice",
        action="append",
        type=objective_entry,
        default=[],
        metavar="NAME=NICE",
        help="an HTTP request whose x-gateway-inference-objective header names NAME (an inference pool's "
        "InferenceObjective) runs at this nice unless its body sets one (repeatable; see docs/kubernetes.md)",
    )
    h.add_argument(
        "--metrics-port",
        type=port,
        metavar="PORT",
        help="serve Prometheus metrics at http://127.0.0.1:PORT/metrics (0: a free port)",
    )


# ---- what the options mean ------------------------------------------------------------------
def effective_options(sp: argparse.ArgumentParser, given: argparse.Namespace, config: str | None) -> argparse.Namespace:
    """Flags over environment over file over defaults; the result also carries how to re-read it (SIGHUP)."""
    path = C.config_path(config)
    eff = C.resolve(sp, given, path)
    ns = argparse.Namespace(**vars(eff.values), cmd="serve", config=str(path) if path else None)
    ns.effective = eff
    ns.reload_options = lambda: C.resolve(sp, given, path)
    return ns


def policy_from(ns: argparse.Namespace):
    """The policy named by the options; a time quantum of 100 ms unless a quantum is given."""
    from scheduler.policies import Quantum, make_policy

    ms = ns.quantum_ms if ns.quantum_ms or ns.quantum_tokens else C.DEFAULT_QUANTUM_MS
    if ms is not None and math.isinf(ms):  # --quantum-ms inf: no time limit (rr then runs as FIFO)
        ms = None
    return make_policy(ns.policy, Quantum(tokens=ns.quantum_tokens, ms=ms), policy_opts(ns.policy_opt))


def policy_opts(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--policy-opt wants KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out

"""The daemon's own entry: ``quantad serve`` and ``quantad config``, from options to a running daemon.

``python -m scheduler serve`` runs ``main`` here; the ``quantad`` console hands these two commands
here too.  The model is located by ``backends.model_store`` in a child process, so the daemon
never imports torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ipc.endpoints import agent_endpoint, state_dir, worker_endpoint
from ipc.logfmt import setup as setup_logging
from ipc.worker_spec import WorkerSpec
from scheduler import config as C
from scheduler import netaddr, pidlock
from scheduler.options import (
    add_config_command,
    add_serve_command,
    command_parser,
    effective_options,
    policy_from,
    serve_parser,
)

COMMANDS = ("serve", "config")


def build_parser() -> argparse.ArgumentParser:
    ap, sub = command_parser("The quantad daemon: serve, and check its configuration.")
    add_serve_command(sub)
    add_config_command(sub)
    return ap


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
    try:
        return cmd_serve(args) if args.cmd == "serve" else cmd_config(args)
    except TimeoutError as exc:
        print(f"quantad: {exc} (is 'quantad serve' running?)", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        return 130


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


# ---- serve --------------------------------------------------------------------------------
def resolve_model(model: str, gguf: bool = False) -> str:
    """Convert/locate the model (``gguf``: the GGUF file itself) in a child process (the daemon never imports torch)."""
    flag = ["--gguf"] if gguf else []
    out = subprocess.run(
        [sys.executable, "-m", "backends.model_store", *flag, model], stdout=subprocess.PIPE, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"quantad: cannot load model {model!r} (see above)")
    return out.stdout.strip().splitlines()[-1]


def prepare_ipc_dir(endpoint: str) -> None:
    """The socket's directory: made if missing; refused unless ours and writable by no one else.

    Whoever can write there can replace the socket with their own and read every prompt.
    """
    if not endpoint.startswith("ipc://"):
        return
    d = Path(endpoint[len("ipc://") :]).parent
    d.mkdir(mode=0o750, parents=True, exist_ok=True)
    st = d.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise SystemExit(
            f"quantad: refusing the socket directory {d}: it must belong to uid {os.getuid()} and not be "
            f"writable by group or others (owner uid {st.st_uid}, mode {st.st_mode & 0o777:o}); "
            "fix it (chmod go-w) or choose another --endpoint"
        )


def pick_backend(backend: str, model: str | None) -> str:
    """``auto``: llama.cpp for a GGUF (the embedded default is one) when its bindings are installed, else hf.

    A model directory is HuggingFace's.  Looked up without importing llama.cpp (the daemon loads no engine).
    """
    if backend != "auto":
        return backend
    gguf = model in (None, "", "smollm2") or str(model).endswith(".gguf")
    if not gguf:
        return "hf"
    if importlib.util.find_spec("llama_cpp") is None:
        logging.getLogger("quantad").warning(
            "event=backend_fallback backend=hf note=%r", "llama.cpp is not installed (make llama-server): hf engine"
        )
        return "hf"
    return "llamacpp"


def cmd_serve(args: argparse.Namespace) -> int:
    from scheduler.daemon import serve

    setup_logging(args.log_level, args.log_format)
    args.backend = pick_backend(args.backend, args.model)
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
    try:
        lock = pidlock.hold(Path(args.state_dir or state_dir()))  # kept open until the process ends
    except pidlock.StateDirBusy as exc:
        print(f"quantad serve: {exc}", file=sys.stderr)
        return 1
    try:
        return serve(daemon_config(args, endpoint, wep, policy, http, token))
    finally:
        os.close(lock)


def daemon_config(args: argparse.Namespace, endpoint: str, wep: str, policy, http, token):
    """The ``DaemonConfig`` of these options (the model is located first, for the hf backend)."""
    from scheduler.daemon_config import DaemonConfig

    spec = worker_spec(args, wep)
    if args.backend == "openai":
        name, aliases = spec.model, ()
    else:
        name, aliases = Path(spec.model).name, (args.model or "smollm2", spec.model)
    return DaemonConfig(
        keys=curve_keys(args.curve_dir, (endpoint, wep), args.allow_plaintext),
        endpoint=endpoint,
        worker_endpoint=wep,
        policy=policy,
        spec=spec,
        workers=args.workers,
        liveness_s=args.liveness_s,
        max_restarts=args.max_restarts,
        grace_s=args.grace_s,
        log_format=args.log_format,
        options=getattr(args, "effective", None),
        reload_options=getattr(args, "reload_options", None),
        build_policy=policy_from,
        model_name=name,
        model_aliases=aliases,
        http=http,
        http_token=token,
        objective_nice=objective_nice(args.objective_nice),
        metrics_port=args.metrics_port,
        limits=limits_of(args),
        journal=Path(args.state_dir or state_dir()) / "journal.db" if args.journal else None,
        journal_keep_s=args.journal_keep_s,
        responses_keep_s=args.responses_keep_s,
        max_stored_responses=args.max_stored_responses,
        on_stop=args.on_stop,
    )


def limits_of(args: argparse.Namespace):
    """The quotas and rates of ``--requests-per-identity`` and the rest (unset: the defaults)."""
    import dataclasses

    from scheduler.limits import Limits

    given = {
        "requests_per_identity": args.requests_per_identity,
        "tokens_per_identity": args.tokens_per_identity,
        "messages_per_s": args.rate_limit,
        "burst": args.rate_burst,
        "max_unread": args.max_unread,
        "max_connections": args.max_connections,
    }
    return dataclasses.replace(Limits(), **{k: v for k, v in given.items() if v is not None})


def curve_keys(curve_dir: str | None, endpoints: tuple[str, ...], allow_plaintext: bool):
    """The daemon's CURVE keys (``--curve-dir``); a plaintext non-loopback tcp:// bind needs ``--allow-plaintext``."""
    from scheduler.gate import load_keys

    log = logging.getLogger("quantad")
    if curve_dir:
        return load_keys(Path(curve_dir))
    for ep in endpoints:
        if not ep.startswith("tcp://"):
            continue
        host = ep[len("tcp://") :].rpartition(":")[0].strip("[]")
        if netaddr.is_loopback(host):
            log.warning("event=plaintext_tcp endpoint=%s note=%r", ep, "any local user may connect; see --curve-dir")
        elif not allow_plaintext:
            raise SystemExit(f"quantad: {ep} is not loopback: give --curve-dir (CURVE keys) or --allow-plaintext")
        else:
            log.warning("event=plaintext_tcp endpoint=%s note=%r", ep, "open to the network without CURVE")
    return None


def worker_spec(args: argparse.Namespace, wep: str) -> WorkerSpec:
    """Every worker's options (each worker's name and own state directory are filled in at its start)."""
    common = {"backend": args.backend, "endpoint": wep, "slots": args.slots, "heartbeat_s": args.heartbeat_s}
    if args.backend == "openai":
        return WorkerSpec(model=args.model, **common, **api_options(args))
    return WorkerSpec(
        model=resolve_model(args.model or "smollm2", gguf=args.backend == "llamacpp"),
        device=args.device,
        dtype=args.dtype,
        device_budget=args.device_budget,
        host_budget=args.host_budget,
        disk_budget=args.disk_budget,
        snapshot_tier=args.snapshot_tier,
        state_dir=(args.state_dir or str(state_dir())) if args.disk_budget > 0 else None,
        prefill_chunk=args.prefill_chunk,
        threads=args.threads,
        ctx_size=args.ctx_size,
        prefix_cache=args.cache_ram if args.prefix_cache is None else args.prefix_cache,
        **common,
    )


def objective_nice(items: list[str]) -> dict[str, int]:
    """``--objective-nice NAME=NICE`` entries (checked by ``options.objective_entry``) -> {objective: nice}."""
    return {name: int(nice) for name, _, nice in (item.rpartition("=") for item in items)}


def token_entries(text: str) -> dict[str, str]:
    """Bearer tokens and whose they are: a line ``NAME TOKEN`` each (``#`` comments), or one bare token.

    Each name is an identity of its own (``http:NAME``): its requests, quotas and sessions.
    """
    out: dict[str, str] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) == 1:
            out[fields[0]] = "default"
        elif len(fields) == 2:
            out[fields[1]] = fields[0]
        elif fields:
            raise ValueError("an HTTP token line is 'NAME TOKEN' or a bare token")
    return out


def http_options(args: argparse.Namespace) -> tuple[tuple[str, int] | None, dict[str, str] | None]:
    """Where the HTTP front listens and its token; a non-loopback address needs --http-allow-remote."""
    token = None
    if args.http_token_file:
        try:
            token = token_entries(Path(args.http_token_file).read_text())
        except OSError as exc:
            raise ValueError(f"cannot read --http-token-file {args.http_token_file}: {exc.strerror}") from None
    elif args.http_token_env:
        token = token_entries(os.environ.get(args.http_token_env, ""))
    if token == {}:
        raise ValueError("the HTTP bearer token is empty (--http-token-file / --http-token-env)")
    if not args.http:
        return None, token
    host, port = netaddr.split(args.http)
    if not netaddr.is_loopback(host):
        if not args.http_allow_remote:
            raise ValueError(
                f"--http {args.http} is not a loopback address; pass --http-allow-remote to listen "
                "there (with --http-token-file)"
            )
        if token is None:
            logging.getLogger("quantad").warning("event=http_remote_without_token address=%s", args.http)
    return (host, port), token


def api_options(args: argparse.Namespace) -> dict[str, Any]:
    """The API workers' options.  The key itself never goes on a command line, only where to find it."""
    if not args.base_url or not args.model:
        raise SystemExit("quantad serve: --backend openai needs --base-url URL and --model NAME")
    if args.api_key_file and not Path(args.api_key_file).is_file():
        raise SystemExit(f"quantad serve: no API key file {args.api_key_file}")
    return {
        "base_url": args.base_url,
        "api_timeout_s": args.api_timeout_s,
        "api_retries": args.api_retries,
        "resume_method": args.resume_method,
        "api_key_env": args.api_key_env or None,
        "api_key_file": str(Path(args.api_key_file).resolve()) if args.api_key_file else None,
        "tokenizer": str(Path(args.tokenizer).resolve()) if args.tokenizer else None,
    }

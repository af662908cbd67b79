"""``quantad keygen`` and ``quantad worker``: CURVE key pairs, and a worker on another machine.

``keygen DIR --name NAME`` writes ``NAME.key`` (public, to hand out) and ``NAME.key_secret``
(mode 0600) with ``zmq.auth``; the daemon's own pair is ``--name server`` in its ``--curve-dir``.
``worker --connect tcp://HOST:PORT`` runs one worker here for a daemon there: it logs in with
CURVE, its key's public half in the daemon's ``DIR/workers/NAME.key`` (the file's name is the
worker's name: the daemon trusts no name a peer gives itself).
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
from pathlib import Path

import zmq.auth

from ipc.credentials import load_client_keys


def cmd_keygen(args: argparse.Namespace) -> int:
    d = Path(args.dir)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = d / f"{args.name}.key", d / f"{args.name}.key_secret"
    if (public.exists() or secret.exists()) and not args.force:
        print(f"quantad keygen: {public} or {secret} exists (--force replaces them)")
        return 1
    old = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
    try:
        made_public, made_secret = zmq.auth.create_certificates(str(d), args.name)
    finally:
        os.umask(old)
    os.chmod(made_secret, stat.S_IRUSR | stat.S_IWUSR)
    os.chmod(made_public, 0o644)
    print(f"public key: {made_public}\nsecret key: {made_secret} (mode 0600)")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """The worker process itself (``python -m backends.worker``), its CURVE keys on stdin as the daemon's get theirs."""
    from ipc.worker_spec import WorkerSpec
    from scheduler.launch import resolve_model

    server, public, secret = load_client_keys(args.curve_key, args.curve_server)
    name = args.name or Path(args.curve_key).name.split(".")[0]
    model = args.model if args.backend == "openai" else resolve_model(args.model, gguf=args.backend == "llamacpp")
    spec = WorkerSpec(
        backend=args.backend,
        endpoint=args.connect,
        name=name,
        model=model,
        slots=args.slots,
        threads=args.threads,
        peer_endpoint="",
        base_url=args.base_url,
        credentials="stdin",
    )
    creds = {"curve": {"server": server.decode(), "public": public.decode(), "secret": secret.decode()}}
    print(f"quantad worker {name}: connecting to {args.connect} ({args.backend}, {args.slots} slot(s))", flush=True)
    try:
        return subprocess.run(
            spec.argv(), input=json.dumps(creds) + "\n", env={**os.environ, **spec.env()}, text=True, check=False
        ).returncode
    except KeyboardInterrupt:
        return 130


def add_commands(sub: argparse._SubParsersAction) -> None:
    k = sub.add_parser("keygen", help="write a CURVE key pair (NAME.key, NAME.key_secret with mode 0600)")
    k.add_argument("dir", help="directory for the two files (made with mode 0700 if missing)")
    k.add_argument("--name", default="client", help="file names (default client; the daemon's own: server)")
    k.add_argument("--force", action="store_true", help="replace existing files")

    w = sub.add_parser(
        "worker",
        help="run a worker here for a daemon elsewhere, over CURVE",
        description="The daemon must list this worker's public key as DIR/workers/NAME.key in its --curve-dir.",
    )
    w.add_argument("--connect", required=True, metavar="tcp://HOST:PORT", help="the daemon's worker endpoint")
    w.add_argument("--curve-key", required=True, metavar="FILE", help="this worker's NAME.key_secret")
    w.add_argument("--curve-server", required=True, metavar="FILE", help="the daemon's public key (server.key)")
    w.add_argument("--name", help="the worker's name (default: the key file's; it must match the daemon's list)")
    w.add_argument("--backend", default="hf", choices=("hf", "llamacpp", "openai"))
    w.add_argument("--model", default="smollm2", help="as for 'quantad serve --model'")
    w.add_argument("--slots", type=int, default=1)
    w.add_argument("--threads", type=int, default=0, help="llama.cpp compute threads (0: every core)")
    w.add_argument("--base-url", help="--backend openai: the API's base URL")

"""What a daemon is started with: ``scheduler.launch`` fills it from the serve options."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ipc.worker_spec import WorkerSpec
from scheduler.config import Effective
from scheduler.gate import Keys
from scheduler.limits import Limits
from scheduler.policy import Policy
from scheduler.response_store import DEFAULT_KEEP_S, DEFAULT_MAX_PER_IDENTITY


@dataclass
class DaemonConfig:
    endpoint: str
    worker_endpoint: str
    policy: Policy
    spec: WorkerSpec  # every worker's options (its command line); endpoint and name are filled in per worker
    workers: int = 1
    liveness_s: float = 30.0
    max_restarts: int = 5
    grace_s: float = 30.0  # SIGTERM: how long running requests may go on before they are cut
    log_format: str = "kv"  # passed on to the workers
    options: Effective | None = None  # the resolved serve options (for SIGHUP's diff)
    reload_options: Callable[[], Effective] | None = None  # re-reads the config file on SIGHUP
    build_policy: Callable[[argparse.Namespace], Policy] | None = None
    model_name: str = ""  # what /v1/models calls the model (a directory's name, or the remote name)
    model_aliases: tuple[str, ...] = ()  # other names an HTTP request may give (--model as given, the path)
    http: tuple[str, int] | None = None  # OpenAI-compatible HTTP front (host, port); None: off
    http_token: dict[str, str] | None = None  # bearer tokens the HTTP front accepts -> whose (``http:NAME``)
    objective_nice: dict[str, int] = field(default_factory=dict)  # an inference objective's name -> its nice
    metrics_port: int | None = None  # Prometheus /metrics on 127.0.0.1; None: off
    keys: Keys | None = None  # CURVE: the daemon's key pair and the allowed keys (``--curve-dir``)
    limits: Limits = field(default_factory=Limits)  # quotas per identity, rates per connection
    journal: Path | None = None  # the SQLite journal of accepted requests (``scheduler.journal``); None: off
    journal_keep_s: float = 300.0  # how long an ended request stays there, for ``attach``
    responses_keep_s: float = DEFAULT_KEEP_S  # how long a stored response (Responses API) is kept
    max_stored_responses: int = DEFAULT_MAX_PER_IDENTITY  # per identity; past it the oldest finished one goes
    on_stop: str = "drain"  # SIGTERM: drain (finish within grace), or handover (leave all to the next daemon)

"""The sweep: one server per (policy, quantum) point, the same workload against each, then the report.

Each peer named in ``cfg.peer`` is a point of its own after the sweep: ``transformers`` (target
``peer``: ``transformers serve --continuous-batching`` on the model directory) and ``llama-server``
(target ``llama-server``: llama.cpp's server on the model's GGUF, ``cfg.slots`` slots).
"""

from __future__ import annotations

import asyncio
import datetime
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import report
from benchmarks.harness.config import BenchConfig, quantum_label
from benchmarks.harness.driver import OpenAITarget, QuantadTarget, drive, new_record
from benchmarks.harness.metrics import point_metrics
from benchmarks.harness.servers import (
    HttpServer,
    LlamaServer,
    PeerServer,
    PolicyRejected,
    QuantadServer,
    ServerError,
    eos_token_id,
    llama_server_exe,
    resolve_gguf,
)
from benchmarks.harness.workloads import Call, Workload, make_workload
from scheduler.launch import resolve_model  # the model store, in a child process (no torch here)

WARMUP = Call(idx=-1, agent="warmup", session="", cls="short", prompt="Say hello.", max_tokens=4, min_tokens=0)


def sweep_points(cfg: BenchConfig) -> list[tuple[str, float]]:
    """(policy, quantum ms) pairs in sweep order.  ``fifo`` runs once (its quantum is infinite);
    ``rr`` at ``inf`` is FIFO, so it is skipped when ``fifo`` is in the sweep."""
    out: list[tuple[str, float]] = []
    for policy in cfg.policies:
        for q in [math.inf] if policy == "fifo" else cfg.quanta:
            if policy == "rr" and math.isinf(q) and "fifo" in cfg.policies:
                continue
            if (policy, q) not in out:
                out.append((policy, q))
    return out


def label(policy: str, quantum: str) -> str:
    return policy if policy == "fifo" or quantum in ("", "running") else f"{policy} q={quantum}"


def _psi_total_s() -> float | None:
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split("total=")[1]) / 1e6
    except (OSError, IndexError, ValueError):
        return None


def _bar(cfg: BenchConfig, **kw: Any):
    from tqdm import tqdm

    return tqdm(disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True, **kw)


async def _run_target(target, workload: Workload, cfg: BenchConfig, desc: str) -> tuple[list, dict]:
    for _ in range(cfg.warmup):  # the first forward pass of a process pays one-off setup
        rec = new_record(WARMUP)
        await target.call(WARMUP, [{"role": "user", "content": WARMUP.prompt}], rec, _Zero())
        if rec.error is not None:
            raise ServerError(f"the warm-up request failed: {rec.error}")
    costs: dict[str, Any] = {}
    if isinstance(target, QuantadTarget):
        costs["ping_ms"] = await target.ping_ms()
    with _bar(cfg, total=len(workload.all_calls), desc=desc, unit="req", leave=False) as bar:
        recs, run_costs = await asyncio.wait_for(drive(target, workload, on_done=lambda r: bar.update()),
                                                 cfg.timeout_s)  # fmt: skip
    return recs, costs | run_costs


class _Zero:
    def now(self) -> float:
        return 0.0


class QuantadHttpTarget(OpenAITarget):
    """quantad through its OpenAI-compatible front, as agent frameworks reach it (``agents-chat``)."""

    name = "quantad"

    def _extra(self, call: Call) -> dict[str, Any]:
        return {"extra_body": {"min_tokens": call.min_tokens}} if call.min_tokens else {}


def over_http(cfg: BenchConfig) -> bool:
    """Whether quantad is driven through its HTTP front (``--http``) instead of its own socket."""
    return cfg.workload == "agents-chat"


def _http_target(endpoint: str, cfg: BenchConfig) -> QuantadHttpTarget:
    import json
    import urllib.request

    from ipc.client import Client

    with Client(endpoint) as c:
        url = c.stats()["endpoints"]["http"]
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as r:
        model = json.load(r)["data"][0]["id"]
    return QuantadHttpTarget(url + "/v1", model, cfg.temperature)


async def _quantad_point(endpoint: str, workload: Workload, cfg: BenchConfig, desc: str) -> tuple[list, dict]:
    target = _http_target(endpoint, cfg) if over_http(cfg) else QuantadTarget(endpoint, cfg.temperature, cfg.seed)
    try:
        return await _run_target(target, workload, cfg, desc)
    finally:
        await target.close()


class LlamaServerTarget(OpenAITarget):
    """llama-server: lengths through its own ``ignore_eos`` (EOS and the other end-of-generation tokens
    banned), so min_tokens = max_tokens gives exactly ``max_tokens``; it has no smaller min_tokens."""

    name = "llama-server"

    def _extra(self, call: Call) -> dict[str, Any]:
        if call.min_tokens and call.min_tokens >= call.max_tokens:
            return {"extra_body": {"ignore_eos": True}}
        return {}


PEER_TARGETS = {"transformers": "peer", "llama-server": "llama-server"}  # peer name -> the points' target
PEER_LABELS = {"peer": "transformers serve (peer)", "llama-server": "llama-server (peer)"}  # target -> label


async def _peer_point(target: OpenAITarget, workload: Workload, cfg: BenchConfig, desc: str) -> tuple[list, dict]:
    try:
        return await _run_target(target, workload, cfg, desc)
    finally:
        await target.close()


def _point(policy: str, quantum: str, target: str, recs=None, costs=None, cfg=None, error=None) -> dict[str, Any]:
    p: dict[str, Any] = {"label": PEER_LABELS.get(target) or label(policy, quantum),
                         "policy": policy, "quantum": quantum, "target": target, "error": error}  # fmt: skip
    if error is None:
        p["metrics"] = point_metrics(recs, costs, cfg.workers if target == "quantad" else 1)
        p["records"] = [r.to_dict() for r in recs]
    return p


def _running_policy(endpoint: str) -> str:
    from ipc.client import Client

    with Client(endpoint) as c:
        c.wait_ready(30.0)
        return str(c.ps().get("policy", "?"))


def _failed(what: str, exc: BaseException, cfg: BenchConfig) -> str:
    msg = str(exc) or f"timed out after {cfg.timeout_s:g} s"
    print(f"quantad bench: {what} failed: {msg}", file=sys.stderr)
    return msg


def _running_point(cfg: BenchConfig, workload: Workload) -> dict[str, Any]:
    """The one point of ``--endpoint``: the daemon already running, under whatever policy it has."""
    policy = _running_policy(cfg.endpoint)
    recs, costs = asyncio.run(_quantad_point(cfg.endpoint, workload, cfg, policy))
    return _point(policy, "running", "quantad", recs, costs, cfg)


def _sweep_point(
    cfg: BenchConfig, policy: str, q: float, workload: Workload, model_dir: str, out: Path, rejected: dict[str, str]
) -> dict[str, Any]:
    """One (policy, quantum) point on a daemon of its own; a policy the daemon rejects goes into ``rejected``."""
    ql = quantum_label(q)
    if policy in rejected:
        return _point(policy, ql, "quantad", error=rejected[policy])
    log = out / "logs" / f"{policy}-q{ql}.log"
    model = cfg.model if serves_gguf(cfg) else model_dir  # llama.cpp workers load the GGUF itself
    extra = [*cfg.serve_args, *(["--http", "127.0.0.1:0"] if over_http(cfg) else [])]
    server = QuantadServer(model, policy, q, log, cfg.slots, cfg.workers, extra)
    try:
        server.wait_ready()
        recs, costs = asyncio.run(_quantad_point(server.endpoint, workload, cfg, label(policy, ql)))
        return _point(policy, ql, "quantad", recs, costs, cfg)
    except (ServerError, TimeoutError) as exc:
        msg = _failed(f"point {label(policy, ql)}", exc, cfg)
        if isinstance(exc, PolicyRejected):
            rejected[policy] = msg
        return _point(policy, ql, "quantad", error=msg)
    finally:
        server.stop()


def serves_gguf(cfg: BenchConfig) -> bool:
    """Whether the sweep's daemons run ``--backend llamacpp`` (given through ``--serve-arg``)."""
    args = " ".join(cfg.serve_args).replace("=", " ").split()
    return any(a == "--backend" and b == "llamacpp" for a, b in zip(args, args[1:], strict=False))


def needs_model_dir(cfg: BenchConfig) -> bool:
    """Whether a daemon or a peer loads the converted model directory: not when llama.cpp serves the GGUF
    itself at every point and the only peer is llama-server (so no conversion, and no gguf package)."""
    daemons = cfg.endpoint is None and not serves_gguf(cfg)
    return daemons or "transformers" in cfg.peer


def _start_peer(name: str, cfg: BenchConfig, model_dir: str | None, out: Path) -> tuple[HttpServer, OpenAITarget]:
    if name == "llama-server":
        llama_server_exe()  # not built: say so before looking for a GGUF
        server: HttpServer = LlamaServer(resolve_gguf(cfg.model), cfg.slots, out / "logs" / "llama-server.log")
        return server, LlamaServerTarget(server.url, server.model, cfg.temperature)
    server = PeerServer(model_dir, out / "logs" / "peer.log")
    return server, OpenAITarget(server.url, server.model, cfg.temperature, eos_token_id(model_dir))


def _peer_run(cfg: BenchConfig, workload: Workload, model_dir: str | None, out: Path, name: str) -> dict[str, Any]:
    """The same workload against one peer: ``transformers`` (``transformers serve --continuous-batching``)
    or ``llama-server``.  ``startup_s``: from its start to its first answer of ``/v1/models``."""
    target = PEER_TARGETS[name]
    try:
        server, client = _start_peer(name, cfg, model_dir, out)
    except ServerError as exc:
        print(f"quantad bench: {target} failed: {exc}", file=sys.stderr)
        return _point(target, "", target, error=str(exc))
    try:
        recs, costs = asyncio.run(_peer_point(client, workload, cfg, target))
        return _point(target, "", target, recs, costs, cfg) | {"startup_s": server.ready_s}
    except (ServerError, TimeoutError) as exc:
        return _point(target, "", target, error=_failed(target, exc, cfg))
    finally:
        server.stop()


def _sweep(cfg: BenchConfig, workload: Workload, model_dir: str | None, out: Path) -> list[dict[str, Any]]:
    """Every point of the sweep (or the running daemon's one), then each peer's, with a progress bar."""
    points: list[dict[str, Any]] = []
    plan = [("running", "running")] if cfg.endpoint else sweep_points(cfg)
    rejected: dict[str, str] = {}  # policies the daemon does not know
    with _bar(cfg, total=len(plan) + len(cfg.peer), desc="sweep", unit="point") as bar:
        for policy, q in plan:
            bar.set_postfix_str(label(policy, q if isinstance(q, str) else quantum_label(q)))
            if cfg.endpoint:
                points.append(_running_point(cfg, workload))
            else:
                points.append(_sweep_point(cfg, policy, q, workload, model_dir, out, rejected))
            bar.update()
        for name in cfg.peer:
            bar.set_postfix_str(PEER_TARGETS[name])
            points.append(_peer_run(cfg, workload, model_dir, out, name))
            bar.update()
    return points


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Run the sweep and write results.json, results.md and the plots under ``cfg.out``."""
    out = Path(cfg.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    workload = make_workload(cfg)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    psi0, t0 = _psi_total_s(), time.monotonic()
    model_dir = resolve_model(cfg.model) if needs_model_dir(cfg) else None
    points = _sweep(cfg, workload, model_dir, out)
    psi1, wall = _psi_total_s(), time.monotonic() - t0
    result: dict[str, Any] = {
        "version": 1,
        "started": started,
        "wall_s": wall,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "cpu_pressure": None if psi0 is None or psi1 is None else f"{(psi1 - psi0) / wall:.0%}",
        "config": cfg.to_dict() | {"model_dir": model_dir},
        "workload": workload.info | {"calls": len(workload.all_calls)},
        "points": points,
    }
    result["targets"] = report.targets(points)
    result["overhead"] = report.overhead(points)
    from benchmarks.harness.plots import write_plots

    result["plots"] = [p.name for p in write_plots(points, out)]
    report.write(result, out)
    return result

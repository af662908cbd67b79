"""The sweep: one server per (policy, quantum) point, the same workload against each, then the report."""

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
from benchmarks.harness.servers import PeerServer, PolicyRejected, QuantadServer, ServerError, eos_token_id
from benchmarks.harness.workloads import Call, Workload, make_workload

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


async def _quantad_point(endpoint: str, workload: Workload, cfg: BenchConfig, desc: str) -> tuple[list, dict]:
    target = QuantadTarget(endpoint, cfg.temperature, cfg.seed)
    try:
        return await _run_target(target, workload, cfg, desc)
    finally:
        await target.close()


async def _peer_point(peer: PeerServer, model_dir: str, workload: Workload, cfg: BenchConfig) -> tuple[list, dict]:
    target = OpenAITarget(peer.url, peer.model, cfg.temperature, eos_token_id(model_dir))
    try:
        return await _run_target(target, workload, cfg, "peer")
    finally:
        await target.close()


def _point(policy: str, quantum: str, target: str, recs=None, costs=None, cfg=None, error=None) -> dict[str, Any]:
    p: dict[str, Any] = {"label": "transformers serve (peer)" if target == "peer" else label(policy, quantum),
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


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Run the sweep and write results.json, results.md and the plots under ``cfg.out``."""
    out = Path(cfg.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    workload = make_workload(cfg)
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    psi0, t0 = _psi_total_s(), time.monotonic()
    model_dir = None
    if cfg.endpoint is None or cfg.peer:
        from scheduler.cli import resolve_model

        model_dir = resolve_model(cfg.model)
    points: list[dict[str, Any]] = []
    plan = [("running", "running")] if cfg.endpoint else sweep_points(cfg)
    n = len(plan) + int(cfg.peer)
    rejected: dict[str, str] = {}  # policies the daemon does not know
    with _bar(cfg, total=n, desc="sweep", unit="point") as bar:
        for policy, q in plan:
            ql = q if isinstance(q, str) else quantum_label(q)
            bar.set_postfix_str(label(policy, ql))
            if cfg.endpoint:
                policy = _running_policy(cfg.endpoint)
                recs, costs = asyncio.run(_quantad_point(cfg.endpoint, workload, cfg, policy))
                points.append(_point(policy, "running", "quantad", recs, costs, cfg))
                bar.update()
                continue
            if policy in rejected:
                points.append(_point(policy, ql, "quantad", error=rejected[policy]))
                bar.update()
                continue
            log = out / "logs" / f"{policy}-q{ql}.log"
            server = QuantadServer(model_dir, policy, q, log, cfg.slots, cfg.workers, cfg.serve_args)
            try:
                server.wait_ready()
                recs, costs = asyncio.run(_quantad_point(server.endpoint, workload, cfg, label(policy, ql)))
                points.append(_point(policy, ql, "quantad", recs, costs, cfg))
            except (ServerError, TimeoutError) as exc:
                msg = str(exc) or f"timed out after {cfg.timeout_s:g} s"
                if isinstance(exc, PolicyRejected):
                    rejected[policy] = msg
                print(f"quantad bench: point {label(policy, ql)} failed: {msg}", file=sys.stderr)
                points.append(_point(policy, ql, "quantad", error=msg))
            finally:
                server.stop()
            bar.update()
        if cfg.peer:
            bar.set_postfix_str("peer")
            try:
                peer = PeerServer(model_dir, out / "logs" / "peer.log")
            except ServerError as exc:
                print(f"quantad bench: peer failed: {exc}", file=sys.stderr)
                points.append(_point("peer", "", "peer", error=str(exc)))
            else:
                try:
                    recs, costs = asyncio.run(_peer_point(peer, model_dir, workload, cfg))
                    points.append(_point("peer", "", "peer", recs, costs, cfg))
                except (ServerError, TimeoutError) as exc:
                    msg = str(exc) or f"timed out after {cfg.timeout_s:g} s"
                    print(f"quantad bench: peer failed: {msg}", file=sys.stderr)
                    points.append(_point("peer", "", "peer", error=msg))
                finally:
                    peer.stop()
            bar.update()
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

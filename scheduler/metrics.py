"""Prometheus metrics of the daemon at ``http://127.0.0.1:PORT/metrics`` (``--metrics-port``).

Gauges and counters are read from the daemon at scrape time by a custom collector over the same
views the ``stats`` and ``workers`` ops answer with, so they never lag or drift from ``quantad top``;
the latency histograms are fed once per finished request through the daemon's finish hook.  The
page is served by aiohttp on the daemon's own loop rather than by prometheus_client's threaded
server, so a scrape reads the request table on the thread that changes it, with no lock.
Loopback only: there is no authentication on this port.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from scheduler.request import Request, State
from scheduler.stats import Views

HOST = "127.0.0.1"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
JCT_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class DaemonCollector(Collector):
    """Live values, read from the daemon's views at each scrape."""

    def __init__(self, views: Views):
        self.views = views

    def collect(self):
        st = self.views.stats()
        workers = self.views.workers()
        yield _labelled(
            GaugeMetricFamily(
                "quantad_requests", "Live requests by state (READY: queued, RUNNING: on a worker)", labels=["state"]
            ),
            st["requests"],
        )
        yield GaugeMetricFamily("quantad_queue_length", "Requests waiting in the run queue", value=st["queue"])
        yield CounterMetricFamily("quantad_requests_accepted", "Chats accepted since start", value=st["accepted"])
        yield _labelled(
            CounterMetricFamily("quantad_requests_finished", "Requests ended since start, by state", labels=["state"]),
            st["finished"],
        )
        yield CounterMetricFamily("quantad_preemptions", "Preemptions since start", value=st["preemptions"])
        yield CounterMetricFamily("quantad_generated_tokens", "Tokens streamed since start", value=st["tokens"])
        families = {
            "up": GaugeMetricFamily("quantad_worker_up", "1 while the worker is alive", labels=["worker"]),
            "restarts": CounterMetricFamily("quantad_worker_restarts", "Restarts of the worker", labels=["worker"]),
            "slots": GaugeMetricFamily("quantad_worker_slots", "Requests it can run at once", labels=["worker"]),
            "used": GaugeMetricFamily("quantad_worker_slots_used", "Requests running on the worker", labels=["worker"]),
            "rss": GaugeMetricFamily(
                "quantad_worker_rss_bytes", "Resident memory of the worker process (heartbeat)", labels=["worker"]
            ),
        }
        ctx = GaugeMetricFamily(
            "quantad_context_bytes", "Saved context (KV) bytes by tier (heartbeat)", labels=["worker", "tier"]
        )
        for w in workers:
            families["up"].add_metric([w["name"]], 1.0 if w["alive"] else 0.0)
            families["restarts"].add_metric([w["name"]], w["restarts"])
            families["slots"].add_metric([w["name"]], w["slots"])
            families["used"].add_metric([w["name"]], w["used"])
            if w["rss_bytes"] is not None:
                families["rss"].add_metric([w["name"]], w["rss_bytes"])
            for tier, n in w["memory"].items():
                ctx.add_metric([w["name"], tier], n)
        yield from families.values()
        yield ctx
        yield from pool_gauges(st, workers, self.views.cfg.spec.device_budget)


def pool_gauges(st: dict[str, Any], workers: list[dict[str, Any]], device_budget: int):
    """The model-server protocol's gauges under vLLM's names, what an inference pool's endpoint picker reads.

    Queued and running requests as ``stats`` counts them; KV-cache use as the fraction of the
    workers' device-tier budget (``--device-budget`` each) their saved contexts fill.
    """
    yield GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting in the run queue", value=st["queue"])
    running = st["requests"].get(State.RUNNING.value, 0)
    yield GaugeMetricFamily("vllm:num_requests_running", "Requests running on a worker", value=running)
    budget = device_budget * sum(1 for w in workers if w["alive"])
    used = sum(w["memory"].get("device", 0) for w in workers if w["alive"])
    usage = min(1.0, used / budget) if budget > 0 else 0.0
    yield GaugeMetricFamily("vllm:kv_cache_usage_perc", "Fraction of the device-tier KV budget in use", value=usage)


def _labelled(family: Any, values: dict[str, int]) -> Any:
    for label, n in values.items():
        family.add_metric([label], n)
    return family


class MetricsServer:
    def __init__(self, views: Views, finish_hooks: list[Callable[[Request], None]], port: int):
        self.port = port
        self.registry = CollectorRegistry()
        self.registry.register(DaemonCollector(views))
        ProcessCollector(registry=self.registry)  # the daemon's own CPU, memory, open files
        self.ttft = Histogram(
            "quantad_time_to_first_token_seconds",
            "Accept to first token, finished requests",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "quantad_time_per_output_token_seconds",
            "Mean time per token after the first, finished requests",
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self.jct = Histogram(
            "quantad_job_completion_seconds",
            "Accept to the last token (job completion time), finished requests",
            buckets=JCT_BUCKETS,
            registry=self.registry,
        )
        finish_hooks.append(self.observe)
        self.runner: web.AppRunner | None = None

    def observe(self, req: Request) -> None:
        """Latencies of a request that finished (``done``); killed and failed ones only count in the totals."""
        if req.state is not State.DONE:
            return
        total = time.monotonic() - req.submitted_at
        self.jct.observe(total)
        if req.first_token_s is not None:
            self.ttft.observe(req.first_token_s)
            if req.generated > 1:
                self.tpot.observe(max(0.0, total - req.first_token_s) / (req.generated - 1))

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/metrics", self.scrape)
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        await web.TCPSite(self.runner, HOST, self.port).start()
        return f"http://{HOST}:{self.runner.addresses[0][1]}/metrics"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def scrape(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

"""The daemon's optional HTTP listeners: Prometheus metrics and the OpenAI-compatible front.

Imported only when asked for, so a plain daemon starts as before; started before any worker
(a port taken fails the start at once), stopped after the drain (HTTP streams have had their
terminal events by then).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from scheduler.daemon_config import DaemonConfig
from scheduler.request import Request
from scheduler.stats import Views

log = logging.getLogger("quantad")


class Fronts:
    def __init__(self, cfg: DaemonConfig, views: Views, finish_hooks: list[Callable[[Request], None]]):
        self.cfg, self.views, self.finish_hooks = cfg, views, finish_hooks
        self.listeners: list[Any] = []  # the HTTP front and the metrics server, when on

    async def start(self) -> None:
        c, urls = self.cfg, self.views.urls
        metrics = None
        if c.metrics_port is not None or c.http is not None:  # the HTTP front serves /metrics too
            from scheduler.metrics import MetricsServer

            metrics = MetricsServer(self.views, self.finish_hooks, c.metrics_port or 0)
        if metrics is not None and c.metrics_port is not None:
            self.listeners.append(metrics)
            urls["metrics"] = await metrics.start()
            log.info("event=metrics_listening url=%s", urls["metrics"])
        if c.http is not None:
            from http_front.server import HttpFront

            names = (c.model_name, *c.model_aliases)
            scrape = metrics.scrape if metrics is not None else None
            front = HttpFront(c.endpoint, c.http[0], c.http[1], names, c.http_token, scrape, c.objective_nice)
            self.listeners.append(front)
            urls["http"] = await self.listeners[-1].start()
            auth = "bearer" if c.http_token else "none"
            log.info("event=http_listening url=%s auth=%s", urls["http"], auth)

    async def stop(self) -> None:
        for front in reversed(self.listeners):
            try:
                await front.stop()
            except Exception:
                log.exception("event=internal_error side=front_stop")
        self.listeners.clear()

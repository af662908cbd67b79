"""The daemon's optional HTTP listeners: Prometheus metrics and the OpenAI-compatible front.

Imported only when asked for, so a plain daemon starts as before; started before any worker
(a port taken fails the start at once), stopped after the drain (HTTP streams have had their
terminal events by then).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scheduler.daemon import Daemon

log = logging.getLogger("quantad")


async def start(d: Daemon) -> None:
    c = d.cfg
    if c.metrics_port is not None:
        from scheduler.metrics import MetricsServer

        d.listeners.append(MetricsServer(d, c.metrics_port))
        d.urls["metrics"] = await d.listeners[-1].start()
        log.info("event=metrics_listening url=%s", d.urls["metrics"])
    if c.http is not None:
        from scheduler.http_front import HttpFront

        names = (c.model_name, *c.model_aliases)
        d.listeners.append(HttpFront(c.endpoint, c.http[0], c.http[1], names, c.http_token))
        d.urls["http"] = await d.listeners[-1].start()
        auth = "bearer" if c.http_token else "none"
        log.info("event=http_listening url=%s auth=%s", d.urls["http"], auth)


async def stop(d: Daemon) -> None:
    for front in reversed(d.listeners):
        try:
            await front.stop()
        except Exception:
            log.exception("event=internal_error side=front_stop")
    d.listeners.clear()

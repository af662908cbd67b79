"""SIGHUP: re-read the configuration and apply the options that can change live.

The policy options take effect at once (running requests get the new quantum now), as do
the log level, liveness, restart limit and grace period; any other change is logged and
waits for a restart.  A bad file is rejected whole and the old settings stay.  Which values
win is decided with the configuration (``Effective.with_live``); this module applies them.
"""

from __future__ import annotations

import logging

from scheduler import sd_notify
from scheduler.config import ConfigError, Effective
from scheduler.core import Scheduler
from scheduler.daemon_config import DaemonConfig
from scheduler.stats import Views
from scheduler.worker_ops import WorkerOps

log = logging.getLogger("quantad")

# Options a SIGHUP applies live; any other change is logged and waits for a restart.
POLICY_KEYS = {"quantum_ms", "quantum_tokens", "policy", "policy_opt"}
LIVE_KEYS = POLICY_KEYS | {"log_level", "liveness_s", "max_restarts", "grace_s"}
DAEMON_KEYS = ("liveness_s", "max_restarts", "grace_s")  # read from the daemon's config each time


def reload(cfg: DaemonConfig, views: Views, worker_ops: WorkerOps) -> None:
    """The SIGHUP handler: systemd hears RELOADING, then READY again, whatever the outcome."""
    sd_notify.notify("RELOADING=1", sd_notify.monotonic_usec(), "STATUS=reloading configuration")
    try:
        if cfg.reload_options is None or cfg.options is None:
            log.warning("event=reload_unsupported")
        else:
            apply(cfg, views.sched, worker_ops, cfg.reload_options())
    except ConfigError as exc:
        for problem in exc.problems:
            log.error("event=reload_rejected problem=%r", problem)
    except Exception:
        log.exception("event=internal_error side=reload")
    sd_notify.notify("READY=1", views.status_line())


def apply(cfg: DaemonConfig, sched: Scheduler, worker_ops: WorkerOps, new: Effective) -> None:
    merged, changes = cfg.options.with_live(new, LIVE_KEYS)
    for key, (before, after) in sorted(changes.items()):
        if key in LIVE_KEYS:
            source = merged.sources[key]
            log.info("event=config_changed key=%s old=%r new=%r source=%s", key, before, after, source)
        else:
            log.warning("event=config_changed key=%s old=%r new=%r applied=no reason=needs_restart", key, before, after)
    cfg.options = merged
    values = merged.values
    if POLICY_KEYS & changes.keys() and cfg.build_policy is not None:
        for req in sched.set_policy(cfg.build_policy(values)):
            worker_ops.next_quantum(req)  # running requests take the new quantum now
    if "log_level" in changes:
        logging.getLogger().setLevel(values.log_level)
    for key in DAEMON_KEYS:
        if key in changes:
            setattr(cfg, key, getattr(values, key))
    q = sched.policy.quantum
    log.info(
        "event=reloaded changed=%s policy=%s quantum_tokens=%s quantum_ms=%s",
        len(changes),
        sched.policy.name,
        q.tokens,
        q.ms,
    )

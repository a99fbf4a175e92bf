"""The supervisor's face to its operators: sd_notify, the watchdog, metrics and health."""

from __future__ import annotations

import logging
import os
import selectors
import time
from collections.abc import Callable

from worker import metrics, systemd
from worker.config import Settings

log = logging.getLogger("guestkit.service")
DRAIN_EXTENSION = 15.0  #: seconds added to systemd's stop timeout each time a drain progresses


class Service:
    """Tells systemd and Prometheus how the loop is doing; every call is cheap and never raises."""

    def __init__(self, settings: Settings, version: str) -> None:
        self.settings = settings
        self.registry = metrics.Registry()
        self.m = metrics.worker_metrics(self.registry)
        self.m.set_info(settings.worker_id, settings.pool, version)
        self.server: metrics.MetricsServer | None = None
        self.watchdog_every = systemd.watchdog_interval()
        self._next_ping = time.monotonic()
        self._status = ""
        self.draining = False
        self.started = False
        self._drain_progress = False
        #: Another readiness condition (the shared queue's reachability), set by the supervisor.
        self.ready_check: Callable[[], tuple[bool, str]] = lambda: (True, "")

    def open(self, selector: selectors.BaseSelector, gauges: Callable[[], None]) -> None:
        """Bind the metrics address (a busy one is a clear start-up error) and serve it."""
        self.registry.on_collect(gauges)
        if not self.settings.metrics_addr:
            return
        host, port = metrics.parse_address(self.settings.metrics_addr)
        self.server = metrics.MetricsServer(host, port, self.registry, self._health, self._ready)
        self.server.register(selector)
        log.info("metrics and health on http://%s:%d/metrics", *self.server.address)

    def _health(self) -> tuple[bool, str]:
        if not os.access(self.settings.jobs_dir, os.W_OK | os.X_OK):
            return False, f"spool {self.settings.jobs_dir} is not writable"
        return True, "ok"

    def _ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining"
        if not self.started:
            return False, "starting"
        ok, why = self.ready_check()
        return (True, "ready") if ok else (False, why)

    def ready(self, text: str) -> None:
        """The spool is recovered and work can be taken."""
        self.started = True
        self._status = text
        systemd.ready(text)

    def reloading(self) -> None:
        """Settings are being reloaded; `ready` follows."""
        systemd.reloading()

    def stopping(self, text: str) -> None:
        """A drain began."""
        self.draining = True
        systemd.stopping(text)

    def progressed(self) -> None:
        """A job reported or finished; during a drain this earns systemd's patience."""
        self._drain_progress = True

    def next_deadline(self) -> float | None:
        """When the loop must wake for us (watchdog ping, idle metrics clients)."""
        times = [t for t in (self._next_ping if self.watchdog_every else None,
                             self.server.next_deadline() if self.server else None) if t]
        return min(times) if times else None

    def heartbeat(self, now: float, status: str) -> None:
        """Called once per loop pass: watchdog ping when due, status when changed, drain credit."""
        if self.watchdog_every and now >= self._next_ping:
            systemd.watchdog()
            self._next_ping = now + self.watchdog_every
        if status != self._status:
            systemd.status(status)
            self._status = status
        if self.draining and self._drain_progress:
            systemd.extend_timeout(self.settings.kill_grace + DRAIN_EXTENSION)
            self._drain_progress = False
        if self.server is not None:
            self.server.expire(now)

    def close(self) -> None:
        """Stop serving metrics."""
        if self.server is not None:
            self.server.close()

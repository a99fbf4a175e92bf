"""Prometheus metrics and the health endpoints, served from the supervisor's selectors loop.

A small registry of counters, gauges and histograms with labels, rendered in the text exposition
format 0.0.4, and :class:`MetricsServer`, a non-blocking HTTP/1.0 server with no threads: its
listening socket and each client socket are registered in the caller's selector with a zero-arg
callback as ``key.data``; the loop calls it whenever the socket is ready. Routes:

``GET /metrics``  the registry, ``text/plain; version=0.0.4``
``GET /healthz``  200 ``ok`` when ``health()`` says so, else 503 with its reason
``GET /readyz``   the same for ``ready()``
anything else     404 (405 for a method other than GET or HEAD)

Each response closes its connection. Requests are capped in size, clients in number, and a
client that has not finished within ``client_timeout`` seconds of connecting is dropped by
:meth:`MetricsServer.expire`, which the loop calls with its deadlines.

:func:`parse_address` reads the ``metrics_addr`` setting; :func:`fetch` is the client side, for
a ``health`` command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import http
import math
import re
import selectors
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import ClassVar, Generic, TypeVar

from worker.errors import ConfigError

#: Content type of the text exposition format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Buckets for job durations, in seconds.
JOB_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
#: Buckets for the time from claiming a job to its child running, in seconds.
SPAWN_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
#: Series one metric may hold; label sets past this are counted nowhere (a cardinality guard).
MAX_SERIES = 10_000

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

Labels = tuple[tuple[str, str], ...]
Sample = tuple[str, Labels, float]


def format_value(value: float) -> str:
    """A sample value as the exposition format writes it (``+Inf``, ``NaN``, ``3``, ``0.25``)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def escape_label_value(value: str) -> str:
    """A label value with backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """A HELP text with backslash and newline escaped."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _sample_line(name: str, labels: Labels, value: float) -> str:
    """One ``name{label="value",...} value`` line."""
    if not labels:
        return f"{name} {format_value(value)}\n"
    inner = ",".join(f'{key}="{escape_label_value(val)}"' for key, val in labels)
    return f"{name}{{{inner}}} {format_value(value)}\n"


class CounterValue:
    """One counter series: only goes up."""

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        """Add ``amount`` (not negative)."""
        if amount < 0:
            raise ValueError(f"a counter cannot go down (inc by {amount})")
        self.value += amount


class GaugeValue:
    """One gauge series: set, raised or lowered at will."""

    def __init__(self) -> None:
        self.value = 0.0

    def set(self, value: float) -> None:
        """Set the value."""
        self.value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        """Raise the value by ``amount``."""
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        """Lower the value by ``amount``."""
        self.value -= amount


class HistogramValue:
    """One histogram series: counts of observations per upper bound, their sum and count."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)  # not cumulative; the last bound is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Record one observation."""
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[index] += 1
                break
        self.sum += value
        self.count += 1


ChildT = TypeVar("ChildT", CounterValue, GaugeValue, HistogramValue)


class Metric(Generic[ChildT]):
    """A metric family: a name, a help text, label names, and one child per label set."""

    kind: ClassVar[str]

    def __init__(self, name: str, documentation: str, labelnames: Iterable[str] = ()) -> None:
        self.labelnames = tuple(labelnames)
        _check_names(name, self.labelnames)
        self.name = name
        self.documentation = documentation
        self._children: dict[tuple[str, ...], ChildT] = {}
        if not self.labelnames:
            self._children[()] = self._new_child()

    def _new_child(self) -> ChildT:
        """A fresh series."""
        raise NotImplementedError

    def labels(self, **labels: object) -> ChildT:
        """The series for these label values (all label names, no others), made on first use."""
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        key = tuple(str(labels[name]) for name in self.labelnames)
        child = self._children.get(key)
        if child is None:
            child = self._new_child()
            if len(self._children) < MAX_SERIES:
                self._children[key] = child
        return child

    def clear(self) -> None:
        """Forget every labelled series."""
        if self.labelnames:
            self._children.clear()

    def family(self) -> str:
        """The name HELP, TYPE and (for counters and gauges) the samples use."""
        return self.name

    def samples(self) -> Iterator[Sample]:
        """Every ``(sample name, labels, value)`` of the family."""
        for key, child in self._children.items():
            yield from self._child_samples(tuple(zip(self.labelnames, key, strict=True)), child)

    def _child_samples(self, labels: Labels, child: ChildT) -> Iterator[Sample]:
        """The samples of one series."""
        raise NotImplementedError

    def expose(self) -> str:
        """HELP and TYPE lines, then every sample line."""
        head = f"# HELP {self.family()} {escape_help(self.documentation)}\n"
        head += f"# TYPE {self.family()} {self.kind}\n"
        return head + "".join(_sample_line(*sample) for sample in self.samples())


def _check_names(name: str, labelnames: tuple[str, ...]) -> None:
    """Raise ValueError for a metric or label name the format does not allow."""
    if not _METRIC_NAME.fullmatch(name):
        raise ValueError(f"invalid metric name {name!r}")
    for label in labelnames:
        if not _LABEL_NAME.fullmatch(label) or label.startswith("__"):
            raise ValueError(f"invalid label name {label!r} for {name}")
    if len(set(labelnames)) != len(labelnames):
        raise ValueError(f"duplicate label names for {name}: {labelnames}")


class Counter(Metric[CounterValue]):
    """A monotonically increasing count; exported with the ``_total`` suffix."""

    kind = "counter"

    def _new_child(self) -> CounterValue:
        return CounterValue()

    def family(self) -> str:
        """The name with ``_total`` (added unless already there)."""
        return self.name if self.name.endswith("_total") else self.name + "_total"

    def inc(self, amount: float = 1.0) -> None:
        """Add to the unlabelled series."""
        self.labels().inc(amount)

    def _child_samples(self, labels: Labels, child: CounterValue) -> Iterator[Sample]:
        yield self.family(), labels, child.value


class Gauge(Metric[GaugeValue]):
    """A value that goes up and down."""

    kind = "gauge"

    def _new_child(self) -> GaugeValue:
        return GaugeValue()

    def set(self, value: float) -> None:
        """Set the unlabelled series."""
        self.labels().set(value)

    def inc(self, amount: float = 1.0) -> None:
        """Raise the unlabelled series."""
        self.labels().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        """Lower the unlabelled series."""
        self.labels().dec(amount)

    def _child_samples(self, labels: Labels, child: GaugeValue) -> Iterator[Sample]:
        yield self.name, labels, child.value


class Histogram(Metric[HistogramValue]):
    """Observations counted into cumulative ``le`` buckets, with their sum and count."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        buckets: Iterable[float] = JOB_DURATION_BUCKETS,
    ) -> None:
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds or len(set(bounds)) != len(bounds):
            raise ValueError(f"{name}: buckets must be distinct and not empty")
        self.bounds = (*bounds, math.inf)
        if "le" in tuple(labelnames):
            raise ValueError(f"{name}: 'le' is reserved for histogram buckets")
        super().__init__(name, documentation, labelnames)

    def _new_child(self) -> HistogramValue:
        return HistogramValue(self.bounds)

    def observe(self, value: float) -> None:
        """Record one observation in the unlabelled series."""
        self.labels().observe(value)

    def _child_samples(self, labels: Labels, child: HistogramValue) -> Iterator[Sample]:
        cumulative = 0
        for bound, count in zip(child.bounds, child.counts, strict=True):
            cumulative += count
            yield f"{self.name}_bucket", (*labels, ("le", format_value(bound))), cumulative
        yield f"{self.name}_sum", labels, child.sum
        yield f"{self.name}_count", labels, child.count


MetricT = TypeVar("MetricT", Counter, Gauge, Histogram)


class Registry:
    """The metrics one endpoint exposes, in registration order."""

    def __init__(self) -> None:
        self._metrics: dict[str, Counter | Gauge | Histogram] = {}
        self._collectors: list[Callable[[], None]] = []

    def register(self, metric: MetricT) -> MetricT:
        """Add ``metric``; a second metric with the same exported name is a ValueError."""
        if metric.family() in self._metrics:
            raise ValueError(f"metric {metric.family()} is already registered")
        self._metrics[metric.family()] = metric
        return metric

    def counter(self, name: str, documentation: str, labelnames: Iterable[str] = ()) -> Counter:
        """Register and return a new counter."""
        return self.register(Counter(name, documentation, labelnames))

    def gauge(self, name: str, documentation: str, labelnames: Iterable[str] = ()) -> Gauge:
        """Register and return a new gauge."""
        return self.register(Gauge(name, documentation, labelnames))

    def histogram(
        self,
        name: str,
        documentation: str,
        labelnames: Iterable[str] = (),
        buckets: Iterable[float] = JOB_DURATION_BUCKETS,
    ) -> Histogram:
        """Register and return a new histogram."""
        return self.register(Histogram(name, documentation, labelnames, buckets))

    def on_collect(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` before every exposition, e.g. to refresh gauges from live state."""
        self._collectors.append(callback)

    def expose(self) -> bytes:
        """The whole registry in the text exposition format; collectors' errors propagate."""
        for callback in self._collectors:
            callback()
        return "".join(metric.expose() for metric in self._metrics.values()).encode()


@dataclasses.dataclass(frozen=True)
class WorkerMetrics:
    """The worker's metric set; every name starts with ``guestkit_worker_``."""

    jobs: Counter  #: finished jobs {operation, outcome}
    job_duration: Histogram  #: wall seconds from spawn to exit {operation}
    queue_depth: Gauge  #: jobs waiting in the inbox and the retry queue
    running_jobs: Gauge  #: job children alive now
    kills: Counter  #: jobs killed by the supervisor {reason}
    retries: Counter  #: jobs sent back for another attempt
    passed_on: Counter  #: jobs from the shared queue passed on unrun {to: worker, pool}
    rejected: Counter  #: job files and queue jobs moved aside unread or invalid
    spawn_latency: Histogram  #: seconds from claiming a job to its child running
    oldest_queued_age: Gauge  #: age in seconds of the oldest waiting job (0 when none)
    descendants_reaped: Counter  #: orphaned job descendants the supervisor (a subreaper) reaped
    info: Gauge  #: always 1 {worker_id, pool, version}

    def set_info(self, worker_id: str, pool: str, version: str) -> None:
        """Make ``worker_info`` the one series with these labels."""
        self.info.clear()
        self.info.labels(worker_id=worker_id, pool=pool, version=version).set(1)


def worker_metrics(registry: Registry) -> WorkerMetrics:
    """Register the worker's metrics in ``registry`` and return them."""
    prefix = "guestkit_worker_"
    return WorkerMetrics(
        jobs=registry.counter(
            prefix + "jobs", "Jobs finished, by operation and outcome.", ("operation", "outcome")
        ),
        job_duration=registry.histogram(
            prefix + "job_duration_seconds", "Wall time of job executions.", ("operation",)
        ),
        queue_depth=registry.gauge(prefix + "queue_depth", "Jobs waiting to run."),
        running_jobs=registry.gauge(prefix + "running_jobs", "Jobs running now."),
        kills=registry.counter(prefix + "kills", "Jobs killed, by reason.", ("reason",)),
        retries=registry.counter(prefix + "retries", "Jobs requeued for another attempt."),
        passed_on=registry.counter(
            prefix + "passed_on", "Jobs from the shared queue this worker could not take, "
            "passed on unrun to another worker or to their pool's queue.", ("to",)
        ),
        rejected=registry.counter(
            prefix + "rejected", "Job files and queue jobs rejected unrun: unreadable, not a "
            "valid job, or a duplicate id (each also has a record in rejected/)."
        ),
        spawn_latency=registry.histogram(
            prefix + "spawn_latency_seconds",
            "Time from claiming a job to its child process running.",
            buckets=SPAWN_LATENCY_BUCKETS,
        ),
        oldest_queued_age=registry.gauge(
            prefix + "oldest_queued_age_seconds", "Age of the oldest waiting job."
        ),
        descendants_reaped=registry.counter(
            prefix + "descendants_reaped", "Orphaned job descendants reaped by the supervisor."
        ),
        info=registry.gauge(prefix + "info", "Worker identity.", ("worker_id", "pool", "version")),
    )


HealthCheck = Callable[[], tuple[bool, str]]


def _response(status: int, body: bytes, *, head: bool = False, content_type: str = "") -> bytes:
    """A complete HTTP/1.0 response that closes the connection."""
    lines = [
        f"HTTP/1.0 {status} {http.HTTPStatus(status).phrase}",
        f"Content-Type: {content_type or 'text/plain; charset=utf-8'}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if status == 405:
        lines.append("Allow: GET, HEAD")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head else body)


_BUSY = _response(503, b"too many connections\n")


class _Client:
    """One accepted connection: read a request head, write one response, close."""

    def __init__(self, server: MetricsServer, sock: socket.socket, deadline: float) -> None:
        self.server = server
        self.sock = sock
        self.deadline = deadline
        self.inbox = bytearray()
        self.outbox = b""
        self.sent = 0
        self.writing = False

    def on_ready(self) -> None:
        """Selector callback: make whatever progress the socket allows; never raises OSError."""
        try:
            if self.writing:
                self._send()
            else:
                self._receive()
        except OSError:
            self.server._drop(self)

    def _receive(self) -> None:
        """Read what has arrived; answer once the head is complete or too big."""
        try:
            chunk = self.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        if not chunk:
            self.server._drop(self)  # closed before finishing its request
            return
        self.inbox += chunk
        if b"\r\n\r\n" in self.inbox or b"\n\n" in self.inbox:
            self._reply(self.server._answer(bytes(self.inbox)))
        elif len(self.inbox) > self.server.max_request:
            self._reply(_response(431, b"request too large\n"))

    def _reply(self, response: bytes) -> None:
        """Switch to writing ``response`` and try to send it at once."""
        self.outbox, self.writing = response, True
        self.server._watch(self, selectors.EVENT_WRITE)
        self._send()

    def _send(self) -> None:
        """Send what the socket takes; close when everything is out."""
        try:
            self.sent += self.sock.send(memoryview(self.outbox)[self.sent :])
        except (BlockingIOError, InterruptedError):
            return
        if self.sent >= len(self.outbox):
            self.server._drop(self, finished=True)


class MetricsServer:
    """Serves /metrics, /healthz and /readyz from the caller's selectors loop; no threads."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: Registry,
        health: HealthCheck,
        ready: HealthCheck,
        *,
        max_clients: int = 16,
        max_request: int = 8192,
        client_timeout: float = 5.0,
    ) -> None:
        self.registry = registry
        self.health = health
        self.ready = ready
        self.max_clients = max_clients
        self.max_request = max_request
        self.client_timeout = client_timeout
        self._listener = _listen(host, port)
        self._selector: selectors.BaseSelector | None = None
        self._clients: dict[int, _Client] = {}

    @property
    def address(self) -> tuple[str, int]:
        """The bound host and port (the real port when 0 was asked for)."""
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def fileno(self) -> int:
        """The listening socket's file descriptor."""
        return self._listener.fileno()

    def register(self, selector: selectors.BaseSelector) -> None:
        """Start serving: the listening socket, and later each client, go into ``selector``."""
        self._selector = selector
        selector.register(self._listener, selectors.EVENT_READ, self._on_accept)

    def next_deadline(self) -> float | None:
        """The earliest ``time.monotonic()`` at which a client should be expired, if any."""
        return min((c.deadline for c in self._clients.values()), default=None)

    def expire(self, now: float | None = None) -> int:
        """Drop clients past their deadline; return how many."""
        now = time.monotonic() if now is None else now
        stale = [c for c in self._clients.values() if c.deadline <= now]
        for client in stale:
            self._drop(client)
        return len(stale)

    def close(self) -> None:
        """Stop serving: close every client and the listening socket."""
        for client in list(self._clients.values()):
            self._drop(client)
        if self._selector is not None and self._listener.fileno() >= 0:
            self._selector.unregister(self._listener)
        self._listener.close()

    def _on_accept(self) -> None:
        """Selector callback for the listening socket: accept what is waiting (bounded)."""
        self.expire()
        for _ in range(64):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # EMFILE, ECONNABORTED...: the next wake-up tries again
            sock.setblocking(False)
            if len(self._clients) >= self.max_clients:
                _refuse(sock)
                continue
            self._add(sock)

    def _add(self, sock: socket.socket) -> None:
        """Track and watch a new client."""
        client = _Client(self, sock, time.monotonic() + self.client_timeout)
        self._clients[sock.fileno()] = client
        if self._selector is not None:
            self._selector.register(sock, selectors.EVENT_READ, client.on_ready)

    def _watch(self, client: _Client, events: int) -> None:
        """Change what the selector waits for on ``client``."""
        if self._selector is not None:
            self._selector.modify(client.sock, events, client.on_ready)

    def _drop(self, client: _Client, finished: bool = False) -> None:
        """Forget and close a client (after a clean half-close when its response is out)."""
        if self._clients.pop(client.sock.fileno(), None) is None:
            return
        if self._selector is not None:
            self._selector.unregister(client.sock)
        if finished:
            _drain_and_shutdown(client.sock)
        client.sock.close()

    def _answer(self, request: bytes) -> bytes:
        """The response to a complete request head."""
        parts = request.split(b"\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return _response(400, b"bad request\n")
        method, target = parts[0], parts[1]
        if method not in (b"GET", b"HEAD"):
            return _response(405, b"method not allowed\n")
        head = method == b"HEAD"
        path = target.split(b"?", 1)[0]
        if path == b"/metrics":
            return self._metrics_response(head)
        if path in (b"/healthz", b"/readyz"):
            return _check_response(self.health if path == b"/healthz" else self.ready, head)
        return _response(404, b"not found\n", head=head)

    def _metrics_response(self, head: bool) -> bytes:
        """200 with the exposition, or 500 when collecting it failed."""
        try:
            body = self.registry.expose()
        except Exception as exc:
            return _response(500, f"collecting metrics failed: {exc!r}\n".encode(), head=head)
        return _response(200, body, head=head, content_type=CONTENT_TYPE)


def _check_response(check: HealthCheck, head: bool) -> bytes:
    """200 ``ok`` when the check passes, else 503 with its reason (or the error it raised)."""
    try:
        ok, reason = check()
    except Exception as exc:
        ok, reason = False, f"check failed: {exc!r}"
    if ok:
        return _response(200, b"ok\n", head=head)
    return _response(503, f"{reason}\n".encode("utf-8", "replace"), head=head)


def parse_address(text: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``; no host means loopback) as a pair, or ConfigError."""
    host, sep, port = text.strip().rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"metrics_addr: {text!r} is not host:port (e.g. 127.0.0.1:9464)")
    return host or "127.0.0.1", int(port)


def fetch(host: str, port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``path`` from a running worker: (status, body); OSError/HTTPException on failure."""
    import http.client  # only the CLI asks: the supervisor would carry it (and ssl) for nothing

    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _listen(host: str, port: int) -> socket.socket:
    """A non-blocking listening TCP socket on ``host:port``, or ConfigError naming the address."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise ConfigError(f"metrics address {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        hint = (" (another worker on this host? give each its own --metrics-addr host:port, "
                "or '' for none)" if exc.errno == errno.EADDRINUSE else "")
        raise ConfigError(f"metrics address {host}:{port}: {exc.strerror or exc}{hint}") from None
    return sock


def _refuse(sock: socket.socket) -> None:
    """Tell an over-limit client we are busy (best effort) and close it."""
    try:
        sock.send(_BUSY)
        _drain_and_shutdown(sock)
    except OSError:
        pass
    sock.close()


def _drain_and_shutdown(sock: socket.socket) -> None:
    """Discard unread input and half-close, so closing sends FIN, not RST, after a response."""
    try:
        for _ in range(16):
            if not sock.recv(4096):
                break
    except OSError:
        pass  # EAGAIN: nothing more waiting
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)

"""The metrics exposition text, and the health/metrics server driven by a real selector loop."""

from __future__ import annotations

import base64
import errno
import math
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest

from worker import metrics
from worker.errors import ConfigError
from worker.metrics import MetricsServer, Registry

# ---------------------------------------------------------------------------------------------
# the registry and the exposition format


def test_exposition_of_each_kind_is_exact() -> None:
    registry = Registry()
    jobs = registry.counter("app_jobs", "Jobs done.", ("operation", "outcome"))
    depth = registry.gauge("app_queue_depth", "Waiting jobs.")
    latency = registry.histogram("app_latency_seconds", "Latency.", buckets=(0.5, 0.1, 1))
    jobs.labels(operation="inspect", outcome="completed").inc()
    jobs.labels(operation="inspect", outcome="completed").inc(2)
    jobs.labels(outcome="failed", operation="convert").inc()
    depth.set(12)
    for value in (0.05, 0.1, 0.7, 3):
        latency.observe(value)
    assert registry.expose().decode() == (
        "# HELP app_jobs_total Jobs done.\n"
        "# TYPE app_jobs_total counter\n"
        'app_jobs_total{operation="inspect",outcome="completed"} 3\n'
        'app_jobs_total{operation="convert",outcome="failed"} 1\n'
        "# HELP app_queue_depth Waiting jobs.\n"
        "# TYPE app_queue_depth gauge\n"
        "app_queue_depth 12\n"
        "# HELP app_latency_seconds Latency.\n"
        "# TYPE app_latency_seconds histogram\n"
        'app_latency_seconds_bucket{le="0.1"} 2\n'
        'app_latency_seconds_bucket{le="0.5"} 2\n'
        'app_latency_seconds_bucket{le="1"} 3\n'
        'app_latency_seconds_bucket{le="+Inf"} 4\n'
        "app_latency_seconds_sum 3.85\n"
        "app_latency_seconds_count 4\n"
    )


def test_unlabelled_metrics_start_at_zero_and_labelled_ones_empty() -> None:
    registry = Registry()
    registry.counter("a_total", "A.")
    registry.counter("b", "B.", ("reason",))
    registry.histogram("c_seconds", "C.", buckets=(1,))
    assert registry.expose().decode() == (
        "# HELP a_total A.\n# TYPE a_total counter\na_total 0\n"
        "# HELP b_total B.\n# TYPE b_total counter\n"
        "# HELP c_seconds C.\n# TYPE c_seconds histogram\n"
        'c_seconds_bucket{le="1"} 0\nc_seconds_bucket{le="+Inf"} 0\n'
        "c_seconds_sum 0\nc_seconds_count 0\n"
    )


def test_labelled_histogram_puts_le_last() -> None:
    registry = Registry()
    hist = registry.histogram("d_seconds", "D.", ("operation",), buckets=(1,))
    hist.labels(operation="x").observe(0.5)
    text = registry.expose().decode()
    assert 'd_seconds_bucket{operation="x",le="1"} 1\n' in text
    assert 'd_seconds_sum{operation="x"} 0.5\n' in text
    assert 'd_seconds_count{operation="x"} 1\n' in text


def test_escaping_of_label_values_and_help() -> None:
    registry = Registry()
    gauge = registry.gauge("e", 'Help with \\ and\nnewline and "quotes".', ("path",))
    gauge.labels(path='C:\\dir\n"x"').set(1)
    assert registry.expose().decode() == (
        '# HELP e Help with \\\\ and\\nnewline and "quotes".\n'
        "# TYPE e gauge\n"
        'e{path="C:\\\\dir\\n\\"x\\""} 1\n'
    )


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (3.0, "3"),
        (-2, "-2"),
        (0.25, "0.25"),
        (1e-05, "1e-05"),
        (2.0**60, "1.152921504606847e+18"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_value_format(value: float, text: str) -> None:
    assert metrics.format_value(value) == text


def test_gauge_moves_both_ways_and_counter_only_up() -> None:
    registry = Registry()
    gauge, counter = registry.gauge("g", "G."), registry.counter("c", "C.")
    gauge.inc(5)
    gauge.dec(2)
    gauge.inc()
    counter.inc(0.5)
    with pytest.raises(ValueError, match="cannot go down"):
        counter.inc(-1)
    assert gauge.labels().value == 4
    assert counter.labels().value == 0.5


@pytest.mark.parametrize(
    "make",
    [
        lambda r: r.counter("bad-name", "x"),
        lambda r: r.counter("ok", "x", ("bad-label",)),
        lambda r: r.counter("ok", "x", ("__reserved",)),
        lambda r: r.counter("ok", "x", ("a", "a")),
        lambda r: r.histogram("ok", "x", ("le",)),
        lambda r: r.histogram("ok", "x", buckets=()),
        lambda r: r.histogram("ok", "x", buckets=(1, 1)),
    ],
)
def test_invalid_definitions_are_refused(make: Callable[[Registry], object]) -> None:
    with pytest.raises(ValueError):
        make(Registry())


def test_duplicate_names_and_wrong_labels_are_refused() -> None:
    registry = Registry()
    counter = registry.counter("jobs", "Jobs.", ("operation",))
    with pytest.raises(ValueError, match="already registered"):
        registry.counter("jobs_total", "Again.")
    with pytest.raises(ValueError, match="takes labels"):
        counter.labels(op="x")
    with pytest.raises(ValueError, match="takes labels"):
        counter.inc()


def test_series_count_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "MAX_SERIES", 3)
    registry = Registry()
    counter = registry.counter("flood", "Untrusted label values.", ("operation",))
    for index in range(10):
        counter.labels(operation=f"op{index}").inc()
    assert registry.expose().decode().count("flood_total{") == 3


def test_collectors_run_before_each_exposition() -> None:
    registry = Registry()
    depth = registry.gauge("depth", "D.")
    queue = [1, 2, 3]
    registry.on_collect(lambda: depth.set(len(queue)))
    assert b"depth 3\n" in registry.expose()
    queue.pop()
    assert b"depth 2\n" in registry.expose()


def test_worker_metric_set() -> None:
    registry = Registry()
    worker = metrics.worker_metrics(registry)
    worker.set_info("w-1", "default", "0.5.0")
    worker.set_info("w-1", "default", "0.6.0")  # a reload: still exactly one info series
    worker.jobs.labels(operation="guestkit.inspect", outcome="completed").inc()
    worker.job_duration.labels(operation="guestkit.inspect").observe(12.5)
    worker.kills.labels(reason="timeout").inc()
    worker.retries.inc()
    worker.passed_on.labels(to="worker").inc()
    worker.rejected.inc()
    worker.spawn_latency.observe(0.0015)
    worker.queue_depth.set(4)
    worker.running_jobs.set(2)
    worker.oldest_queued_age.set(7.5)
    text = registry.expose().decode()
    types = {
        line.split()[2]: line.split()[3] for line in text.splitlines() if line.startswith("# TYPE")
    }
    assert types == {
        "guestkit_worker_jobs_total": "counter",
        "guestkit_worker_job_duration_seconds": "histogram",
        "guestkit_worker_queue_depth": "gauge",
        "guestkit_worker_running_jobs": "gauge",
        "guestkit_worker_kills_total": "counter",
        "guestkit_worker_retries_total": "counter",
        "guestkit_worker_passed_on_total": "counter",
        "guestkit_worker_rejected_total": "counter",
        "guestkit_worker_spawn_latency_seconds": "histogram",
        "guestkit_worker_oldest_queued_age_seconds": "gauge",
        "guestkit_worker_descendants_reaped_total": "counter",
        "guestkit_worker_info": "gauge",
    }
    for line in (
        'guestkit_worker_jobs_total{operation="guestkit.inspect",outcome="completed"} 1',
        'guestkit_worker_job_duration_seconds_bucket{operation="guestkit.inspect",le="10"} 0',
        'guestkit_worker_job_duration_seconds_bucket{operation="guestkit.inspect",le="30"} 1',
        'guestkit_worker_kills_total{reason="timeout"} 1',
        "guestkit_worker_retries_total 1",
        'guestkit_worker_passed_on_total{to="worker"} 1',
        "guestkit_worker_rejected_total 1",
        'guestkit_worker_spawn_latency_seconds_bucket{le="0.002"} 1',
        "guestkit_worker_queue_depth 4",
        "guestkit_worker_running_jobs 2",
        "guestkit_worker_oldest_queued_age_seconds 7.5",
        'guestkit_worker_info{worker_id="w-1",pool="default",version="0.6.0"} 1',
    ):
        assert line + "\n" in text
    assert text.count("guestkit_worker_info{") == 1


# ---------------------------------------------------------------------------------------------
# the server, driven by a real selector loop in this test


class Loop:
    """A selector loop like the supervisor's: wait, then call each ready key's callback."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()

    def run_until(self, done: Callable[[], bool], timeout: float = 10.0) -> None:
        """Dispatch events until ``done()``; fail if nothing happens for ``timeout`` seconds."""
        while not done():
            events = self.selector.select(timeout)
            assert events, f"no event for {timeout} s"
            for key, _ in events:
                key.data()

    def watch_eof(self, fd: int) -> bytearray:
        """Collect what ``fd`` delivers; unregister it at end of file."""
        received = bytearray()

        def on_readable() -> None:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            received.extend(chunk)
            if not chunk:
                self.selector.unregister(fd)  # end of file: see watching()

        self.selector.register(fd, selectors.EVENT_READ, on_readable)
        return received

    def watching(self, fd: int) -> bool:
        """True while ``fd`` is registered."""
        try:
            self.selector.get_key(fd)
        except KeyError:
            return False
        return True


class Health:
    """Mutable answers for /healthz and /readyz."""

    def __init__(self) -> None:
        self.health: tuple[bool, str] = (True, "")
        self.ready: tuple[bool, str] = (True, "")


@pytest.fixture
def health() -> Health:
    return Health()


@pytest.fixture
def served(health: Health) -> Iterator[tuple[Loop, MetricsServer, metrics.WorkerMetrics]]:
    loop = Loop()
    registry = Registry()
    worker = metrics.worker_metrics(registry)
    worker.set_info("w-test", "default", "0.5.0")
    server = MetricsServer(
        "127.0.0.1",
        0,
        registry,
        health=lambda: health.health,
        ready=lambda: health.ready,
        max_clients=4,
        max_request=1024,
    )
    server.register(loop.selector)
    yield loop, server, worker
    server.close()
    loop.selector.close()


CLIENT = """
import base64, http.client, json, sys
host, port, method = sys.argv[1], int(sys.argv[2]), sys.argv[3]
answers = []
for path in sys.argv[4:]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request(method, path)
    resp = conn.getresponse()
    body = resp.read()
    answers.append({"status": resp.status, "headers": dict(resp.getheaders()),
                    "body": base64.b64encode(body).decode(), "version": resp.version})
    conn.close()
print(json.dumps(answers))
"""


def http_get(
    loop: Loop, server: MetricsServer, *paths: str, method: str = "GET"
) -> list[tuple[int, dict[str, str], bytes]]:
    """Fetch ``paths`` with http.client in another process while this loop serves them."""
    host, port = server.address
    argv = [sys.executable, "-c", CLIENT, host, str(port), method, *paths]
    with subprocess.Popen(argv, stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        out = loop.watch_eof(fd)
        loop.run_until(lambda: not loop.watching(fd))
        assert proc.wait() == 0
    return [
        (a["status"], a["headers"], base64.b64decode(a["body"])) for a in orjson.loads(bytes(out))
    ]


def raw_exchange(loop: Loop, server: MetricsServer, request: bytes) -> bytes:
    """Send raw bytes from a socket in this process; return everything until the server closes."""
    client = socket.create_connection(server.address)
    client.sendall(request)
    client.setblocking(False)
    got = loop.watch_eof(client.fileno())
    loop.run_until(lambda: not loop.watching(client.fileno()))
    client.close()
    return bytes(got)


def test_port_zero_binds_a_real_port(
    served: tuple[Loop, MetricsServer, metrics.WorkerMetrics],
) -> None:
    _, server, _ = served
    host, port = server.address
    assert host == "127.0.0.1" and port > 0
    assert server.fileno() >= 0


def test_metrics_endpoint_serves_the_registry_and_values_move(
    served: tuple[Loop, MetricsServer, metrics.WorkerMetrics],
) -> None:
    loop, server, worker = served
    [(status, headers, body)] = http_get(loop, server, "/metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert int(headers["Content-Length"]) == len(body)
    assert b"guestkit_worker_running_jobs 0\n" in body
    assert b'guestkit_worker_info{worker_id="w-test",pool="default",version="0.5.0"} 1\n' in body
    worker.running_jobs.inc()
    worker.jobs.labels(operation="test.echo", outcome="completed").inc()
    [(_, _, body)] = http_get(loop, server, "/metrics?x=1")
    assert b"guestkit_worker_running_jobs 1\n" in body
    assert b'guestkit_worker_jobs_total{operation="test.echo",outcome="completed"} 1\n' in body


def test_a_response_larger_than_the_socket_buffer_is_written_in_pieces(
    served: tuple[Loop, MetricsServer, metrics.WorkerMetrics],
) -> None:
    loop, server, _ = served
    wide = server.registry.gauge("wide", "Many long series.", ("name",))
    for index in range(8000):
        wide.labels(name=f"{index:06d}-" + "v" * 1200).set(index)
    expected = server.registry.expose()
    assert len(expected) > 8_000_000  # more than a loopback socket takes in one send
    [(status, _, body)] = http_get(loop, server, "/metrics")
    assert status == 200
    assert body == expected


def test_health_and_readiness_report_their_reasons(
    served: tuple[Loop, MetricsServer, metrics.WorkerMetrics], health: Health
) -> None:
    loop, server, _ = served
    answers = http_get(loop, server, "/healthz", "/readyz")
    assert [(status, body) for status, _, body in answers] == [(200, b"ok\n"), (200, b"ok\n")]
    health.health = (False, "spool not writable: /var/lib/guestkit-worker/jobs")
    health.ready = (False, "draining")
    answers = http_get(loop, server, "/healthz", "/readyz")
    assert [(status, body) for status, _, body in answers] == [
        (503, b"spool not writable: /var/lib/guestkit-worker/jobs\n"),
        (503, b"draining\n"),
    ]


def test_unknown_paths_and_methods(
    served: tuple[Loop, MetricsServer, metrics.WorkerMetrics],
) -> None:
    loop, server, _ = served
    [(status, _, body)] = http_get(loop, server, "/nope")
    assert (status, body) == (404, b"not found\n")
    [(status, headers, _)] = http_get(loop, server, "/metrics", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"


def test_head_has_headers_but_no_body(
    served: tuple[Loop, MetricsServer, metrics.WorkerMetrics],
) -> None:
    loop, server, _ = served
    reply = raw_exchange(loop, server, b"HEAD /healthz HTTP/1.0\r\n\r\n")
    assert reply == (
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: 3\r\n"
        b"Cache-Control: no-store\r\nConnection: close\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("request_bytes", "status_line"),
    [
        (b"garbage\r\n\r\n", b"HTTP/1.0 400 Bad Request"),
        (b"GET /metrics SPDY/9\r\n\r\n", b"HTTP/1.0 400 Bad Request"),
        (b"GET /healthz HTTP/1.1\nHost: x\n\n", b"HTTP/1.0 200 OK"),
        (b"GET /healthz HTTP/1.0\r\n" + b"X-Pad: " + b"a" * 2000, b"HTTP/1.0 431 "),
    ],
)
def test_malformed_and_oversized_requests(
    served: tuple[Loop, MetricsServer, metrics.WorkerMetrics],
    request_bytes: bytes,
    status_line: bytes,
) -> None:
    loop, server, _ = served
    assert raw_exchange(loop, server, request_bytes).startswith(status_line)


def test_failing_checks_and_collectors_do_not_reach_the_loop(
    served: tuple[Loop, MetricsServer, metrics.WorkerMetrics],
) -> None:
    loop, server, _ = served

    def broken() -> tuple[bool, str]:
        raise RuntimeError("spool gone")

    def broken_collector() -> None:
        raise OSError(errno.EIO, "cannot stat spool")

    server.health = broken
    server.registry.on_collect(broken_collector)
    answers = http_get(loop, server, "/healthz", "/metrics")
    assert answers[0][0] == 503 and b"spool gone" in answers[0][2]
    assert answers[1][0] == 500 and b"cannot stat spool" in answers[1][2]


def test_idle_clients_are_expired_by_the_loop(
    served: tuple[Loop, MetricsServer, metrics.WorkerMetrics],
) -> None:
    loop, server, _ = served
    idle = socket.create_connection(server.address)
    loop.run_until(lambda: server.next_deadline() is not None)  # accepted, says nothing
    deadline = server.next_deadline()
    assert deadline is not None and deadline > time.monotonic()
    assert server.expire(deadline - 0.001) == 0
    assert server.expire(deadline) == 1
    assert server.next_deadline() is None
    idle.settimeout(5)
    assert idle.recv(100) == b""  # closed by the server
    idle.close()


def test_client_limit_answers_busy(
    served: tuple[Loop, MetricsServer, metrics.WorkerMetrics],
) -> None:
    loop, server, _ = served
    idle = [socket.create_connection(server.address) for _ in range(server.max_clients)]
    loop.run_until(lambda: len(server._clients) == server.max_clients)
    reply = raw_exchange(loop, server, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.0 503 ") and reply.endswith(b"too many connections\n")
    server.expire(math.inf)
    for sock in idle:
        sock.close()
    [(status, _, _)] = http_get(loop, server, "/healthz")
    assert status == 200


def test_client_that_hangs_up_early_is_forgotten(
    served: tuple[Loop, MetricsServer, metrics.WorkerMetrics],
) -> None:
    loop, server, _ = served
    early = socket.create_connection(server.address)
    early.sendall(b"GET /metr")
    loop.run_until(lambda: bool(server._clients))
    early.close()
    loop.run_until(lambda: not server._clients)
    assert server.next_deadline() is None


def test_close_releases_the_port_and_the_selector(health: Health) -> None:
    loop = Loop()
    server = MetricsServer("127.0.0.1", 0, Registry(), lambda: health.health, lambda: health.ready)
    server.register(loop.selector)
    address = server.address
    lingering = socket.create_connection(address)
    loop.run_until(lambda: bool(server._clients))
    server.close()
    assert loop.selector.get_map() == {}
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5)
    lingering.close()
    again = MetricsServer(
        "127.0.0.1", address[1], Registry(), lambda: (True, ""), lambda: (True, "")
    )
    again.close()


def test_address_in_use_is_a_config_error(
    served: tuple[Loop, MetricsServer, metrics.WorkerMetrics],
) -> None:
    _, server, _ = served
    host, port = server.address
    with pytest.raises(ConfigError, match=f"metrics address 127.0.0.1:{port}"):
        MetricsServer(host, port, Registry(), lambda: (True, ""), lambda: (True, ""))


def test_unresolvable_host_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=re.escape("metrics address no-such-host.invalid:0")):
        MetricsServer("no-such-host.invalid", 0, Registry(), lambda: (True, ""), lambda: (True, ""))


def test_ipv6_loopback(health: Health) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this Python")
    loop = Loop()
    try:
        server = MetricsServer("::1", 0, Registry(), lambda: health.health, lambda: health.ready)
    except ConfigError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    server.register(loop.selector)
    try:
        [(status, _, body)] = http_get(loop, server, "/healthz")
        assert (status, body) == (200, b"ok\n")
        assert server.address[0] == "::1"
    finally:
        server.close()


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:9100", ("0.0.0.0", 9100)),
        (":9464", ("127.0.0.1", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        ("metrics.example:0", ("metrics.example", 0)),
    ],
)
def test_parse_address(text: str, address: tuple[str, int]) -> None:
    assert metrics.parse_address(text) == address


@pytest.mark.parametrize("text", ["", "9464", "host:", "host:http", "host:70000", "h:-1"])
def test_parse_address_refuses_with_the_setting_name(text: str) -> None:
    with pytest.raises(ConfigError, match="metrics_addr: "):
        metrics.parse_address(text)


def test_fetch_is_the_client_side_of_the_endpoint(
    served: tuple[Loop, MetricsServer, metrics.WorkerMetrics], health: Health
) -> None:
    loop, server, _ = served
    health.ready = (False, "draining")
    host, port = server.address
    script = (
        "import sys; from worker.metrics import fetch; "
        f"status, body = fetch({host!r}, {port}, '/readyz'); "
        "sys.stdout.write(f'{status} {body.decode()}')"
    )
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        out = loop.watch_eof(fd)
        loop.run_until(lambda: not loop.watching(fd))
        assert proc.wait() == 0
    assert bytes(out) == b"503 draining\n"


# ---------------------------------------------------------------------------------------------
# promtool, Prometheus' own checker


def test_promtool_accepts_the_exposition(
    served: tuple[Loop, MetricsServer, metrics.WorkerMetrics], tmp_path: Path
) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    loop, server, worker = served
    worker.jobs.labels(operation="guestkit.inspect", outcome="completed").inc()
    worker.jobs.labels(operation="guestkit.inspect", outcome='we"ird\\out\ncome').inc()
    worker.job_duration.labels(operation="guestkit.inspect").observe(3.2)
    worker.kills.labels(reason="timeout").inc()
    worker.spawn_latency.observe(0.001)
    [(status, _, body)] = http_get(loop, server, "/metrics")
    assert status == 200
    (tmp_path / "metrics.txt").write_bytes(body)
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60
    )
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, b"", b"")

"""A real Prometheus scrapes the metrics server while a selector loop here serves it."""

from __future__ import annotations

import json
import selectors
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from worker import metrics
from worker.metrics import MetricsServer, Registry

pytestmark = pytest.mark.slow

CONFIG = """
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: guestkit
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[Registry, int, Callable[[int], None]]]:
    """(registry, Prometheus web port, loop pump) with Prometheus scraping our server."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian package prometheus)")
    selector = selectors.DefaultSelector()
    registry = Registry()
    scrapes: list[int] = []
    registry.on_collect(lambda: scrapes.append(1))
    server = MetricsServer("127.0.0.1", 0, registry, lambda: (True, ""), lambda: (True, ""))
    server.register(selector)
    (tmp_path / "prometheus.yml").write_text(CONFIG.format(port=server.address[1]))
    web = _free_port()
    argv = [
        binary,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{web}",
    ]

    def pump_until_scrapes(count: int) -> None:
        while len(scrapes) < count:
            events = selector.select(30)
            assert events, "Prometheus did not scrape within 30 s"
            for key, _ in events:
                key.data()

    with open(tmp_path / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        yield registry, web, pump_until_scrapes
    finally:
        proc.terminate()
        proc.wait(30)
        server.close()
        selector.close()


def _query(port: int, promql: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def test_prometheus_ingests_the_worker_metrics(
    prometheus: tuple[Registry, int, Callable[[int], None]],
) -> None:
    registry, port, pump_until_scrapes = prometheus
    worker = metrics.worker_metrics(registry)
    worker.set_info("w-prom", "default", "0.5.0")
    worker.jobs.labels(operation="test.echo", outcome="completed").inc(3)
    worker.job_duration.labels(operation="test.echo").observe(0.3)
    worker.queue_depth.set(7)
    # Each scrape Prometheus starts after the previous one is stored; three leave room for one
    # it may have given up on while this loop was not yet serving.
    pump_until_scrapes(3)
    assert [r["value"][1] for r in _query(port, 'up{job="guestkit"}')] == ["1"]
    jobs = _query(port, "guestkit_worker_jobs_total")
    assert [(r["metric"]["operation"], r["metric"]["outcome"], r["value"][1]) for r in jobs] == [
        ("test.echo", "completed", "3")
    ]
    assert [r["value"][1] for r in _query(port, "guestkit_worker_queue_depth")] == ["7"]
    buckets = _query(port, 'guestkit_worker_job_duration_seconds_bucket{le="0.5"}')
    assert [r["value"][1] for r in buckets] == ["1"]
    info = _query(port, "guestkit_worker_info")
    assert [r["metric"]["worker_id"] for r in info] == ["w-prom"]

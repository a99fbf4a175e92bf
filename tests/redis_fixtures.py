"""A real redis-server per test (free loopback port, AOF on) and supervisors that share it."""

from __future__ import annotations

import collections
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from conftest import Worker, scratch_dir, stop_workers

PREFIX = "guestkit"
STREAM = f"{PREFIX}:jobs:default"
DEAD = f"{PREFIX}:dead:default"
GROUP = "guestkit-workers"


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def poll_until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.05) -> Any:
    """Return check()'s first truthy value, asking again every `every` s until `timeout`."""
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= end:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


class RedisServer:
    """redis-server on a free loopback port, its AOF and log in a directory of the test."""

    def __init__(self, base: Path) -> None:
        self.dir = base
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        """Start the server (appendonly, no RDB); return once it answers PING."""
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        poll_until(self._answers, 20, "redis-server to answer")
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        assert self.proc.poll() is None, (self.dir / "redis.log").read_text()
        try:
            return bool(self.client().ping())
        except (redis.ConnectionError, redis.BusyLoadingError):
            return False

    def stop(self) -> None:
        """SIGTERM (Redis flushes its AOF on the way out) and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, protocol=2, socket_timeout=10)


@pytest.fixture(name="redis_server")
def redis_server_fixture(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server for the test."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server missing: install the Debian package (scripts/test-packages.txt)")
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(name="redis_workers")
def redis_workers_fixture(redis_server: RedisServer) -> Iterator[Callable[..., Worker]]:
    """Build supervisors on the Redis queue, each with its own spool under a fresh dir/<name>
    (outside pytest's base dir, which another pytest run may close to the job user)."""
    made: list[Worker] = []
    base = scratch_dir()

    def make(name: str, *extra: str, env: dict[str, str] | None = None) -> Worker:
        w = Worker(base / name, ["--transport", "redis", "--redis-url", redis_server.url,
                                     "--worker-id", name, "--kill-grace", "1", *extra], env)
        w.base.mkdir(parents=True, exist_ok=True)
        made.append(w)
        return w

    yield make
    stop_workers(made, base)


def lease_env(claim_idle: float, renew: float, **more: Any) -> dict[str, str]:
    """Environment for short leases (and other settings) in a test."""
    env = {"GUESTKIT_WORKER_REDIS_CLAIM_IDLE_SECONDS": str(claim_idle),
           "GUESTKIT_WORKER_REDIS_RENEW_SECONDS": str(renew)}
    env.update({f"GUESTKIT_WORKER_{k.upper()}": str(v) for k, v in more.items()})
    return env


def xadd_jobs(r: redis.Redis, docs: list[dict[str, Any]], stream: str = STREAM) -> None:
    """Put job documents on the stream the way `submit --redis-url` does."""
    for i in range(0, len(docs), 500):
        pipe = r.pipeline(transaction=False)
        for doc in docs[i:i + 500]:
            pipe.xadd(stream, {"job": orjson.dumps(doc)})
        pipe.execute()


def shared_results(r: redis.Redis) -> dict[str, dict[str, Any]]:
    """Every result document in Redis, by job id."""
    names = list(r.scan_iter(match=f"{PREFIX}:result:*", count=1000))
    out: dict[str, dict[str, Any]] = {}
    for i in range(0, len(names), 500):
        chunk = names[i:i + 500]
        for name, raw in zip(chunk, r.mget(chunk), strict=True):
            out[name.decode().rsplit(":", 1)[1]] = orjson.loads(raw)
    return out


def blocked_reads(r: redis.Redis) -> int:
    """How many XREADGROUP calls wait on the server now."""
    return sum(1 for c in r.client_list() if c["cmd"] == "xreadgroup" and "b" in c["flags"])


def settled(r: redis.Redis, stream: str = STREAM) -> bool:
    """True when the stream is empty and nothing is pending: every message was acknowledged."""
    return r.xlen(stream) == 0 and int(r.xpending(stream, GROUP)["pending"]) == 0


def local_results(workers: list[Worker]) -> collections.Counter[str]:
    """How many result files each job id has across the workers' spools."""
    seen: collections.Counter[str] = collections.Counter()
    for w in workers:
        if w.results.exists():
            seen.update(n.removesuffix("-result.json") for n in w.published())
    return seen


def executions(workers: list[Worker]) -> collections.Counter[str]:
    """How many times each job ran, summed over every worker's output dir (test.* ledger)."""
    runs: collections.Counter[str] = collections.Counter()
    for w in workers:
        if w.outputs.exists():
            for name in os.listdir(w.outputs):
                if name.endswith(".runs"):
                    runs[name.removesuffix(".runs")] += len(w.runs(name.removesuffix(".runs")))
    return runs

#!/usr/bin/env python3
"""Throughput of the Redis Streams transport next to the spool's, for the same burst of echo jobs.

Run it with the project's venv: `.venv/bin/python scripts/bench_redis.py [--jobs N] [--workers 1,2]
[--max-concurrent K] [--json OUT] [--dir DIR]`. It needs `redis-server` (Debian package).

1. Spool. One supervisor on a fresh spool (fsync on), warmed up with 20 jobs; N echo job files are
   staged on the same filesystem and renamed into the inbox; the time runs from the first rename
   to the N-th result file (inotify on results/).
2. Redis. A redis-server on a free loopback port (AOF on, appendfsync everysec, no RDB), emptied
   before each row. W supervisors (W = each value of --workers, each on its own spool, K slots
   each) are started with `--transport redis` and warmed up with 20 jobs; N jobs are XADDed in
   one pipeline; the time runs from the XADD to the moment every message is acknowledged (the
   stream empty, nothing pending), which happens only after each result is stored in Redis and
   in a results dir.

Each row is printed as jobs/s with its ratio to the spool's row, and written as JSON with --json.
Every temporary directory is removed at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import redis
from inotify_simple import INotify, flags

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 20
STALL = 120.0  #: seconds without progress before a row gives up
STREAM, GROUP = "guestkit:jobs:default", "guestkit-workers"


def echo_job(job_id: str) -> bytes:
    """One echo job document."""
    return orjson.dumps({"version": "1.0", "job_id": job_id, "kind": "VMOperation",
                         "operation": "system.echo",
                         "payload": {"type": "system.echo.v1", "data": {"message": job_id}}})


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_env() -> dict[str, str]:
    """Worker processes: no config file, no systemd, no metrics port (several run at once)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("GUESTKIT_WORKER_") and k != "NOTIFY_SOCKET"}
    env.update(GUESTKIT_WORKER_CONFIG="/dev/null", GUESTKIT_WORKER_METRICS_ADDR="")
    return env


class Supervisor:
    """`python -m worker supervise` on its own spool under `base`."""

    def __init__(self, base: Path, concurrency: int, *extra: str) -> None:
        self.base = base
        self.jobs, self.results = base / "jobs", base / "results"
        for d in (self.jobs, self.results):
            d.mkdir(parents=True, exist_ok=True)
        self.log = base / "supervisor.log"
        cmd = [sys.executable, "-m", "worker", "supervise", "--jobs-dir", str(self.jobs),
               "--results-dir", str(self.results), "--work-dir", str(base / "work"),
               "--output-dir", str(base / "outputs"), "--max-concurrent", str(concurrency),
               "--log-level", "warning", "--log-format", "human", "--metrics-addr", "", *extra]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                         env=worker_env())

    def check(self) -> None:
        """Raise, with the end of its log, when the supervisor has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"the supervisor exited with {self.proc.returncode}:\n"
                               f"{self.log.read_text(errors='replace')[-3000:]}")

    def stop(self) -> None:
        """SIGTERM (drain), then SIGKILL after a minute."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class RedisServer:
    """redis-server on a free loopback port with its AOF in `base`."""

    def __init__(self, base: Path) -> None:
        base.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--dir", str(base), "--logfile", str(base / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.client = redis.Redis.from_url(self.url, protocol=2, socket_timeout=30)
        _poll(self._answers, 20, "redis-server to answer")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError("redis-server exited at start")
        try:
            return bool(self.client.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        """SIGTERM and wait."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


def _poll(check: Any, timeout: float, what: str, every: float = 0.02) -> None:
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise RuntimeError(f"gave up after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def _settled(r: redis.Redis) -> bool:
    return r.xlen(STREAM) == 0 and int(r.xpending(STREAM, GROUP)["pending"]) == 0


def _wait_results(sup: Supervisor, count: int) -> None:
    """Return once `count` result files exist, woken by inotify on the results dir."""
    ino = INotify()
    ino.add_watch(str(sup.results), flags.CREATE | flags.MOVED_TO)
    try:
        last, stalled_at = -1, time.monotonic() + STALL
        while (n := len(os.listdir(sup.results))) < count:
            if n != last:
                last, stalled_at = n, time.monotonic() + STALL
            elif time.monotonic() > stalled_at:
                raise RuntimeError(f"no progress for {STALL:.0f} s at {n}/{count} results")
            sup.check()
            ino.read(timeout=1000)
    finally:
        ino.close()


def spool_row(base: Path, jobs: int, concurrency: int) -> float:
    """Seconds for `jobs` echo jobs renamed into one supervisor's inbox to all have results."""
    sup = Supervisor(base / "spool", concurrency)
    try:
        stage = base / "stage"
        stage.mkdir()
        for i in range(WARMUP):
            (sup.jobs / f"warm-{i}.json").write_bytes(echo_job(f"warm-{i:04d}"))
        _wait_results(sup, WARMUP)
        names = [f"bench-{i:06d}.json" for i in range(jobs)]
        for name in names:
            (stage / name).write_bytes(echo_job(name.removesuffix(".json")))
        start = time.monotonic()
        for name in names:
            os.rename(stage / name, sup.jobs / name)
        _wait_results(sup, WARMUP + jobs)
        return time.monotonic() - start
    finally:
        sup.stop()


def redis_row(base: Path, server: RedisServer, jobs: int, workers: int, concurrency: int) -> float:
    """Seconds for `jobs` echo jobs XADDed to the stream to be acknowledged by `workers` workers."""
    r = server.client
    r.flushall()
    sups = [Supervisor(base / f"redis-{workers}-{i}", concurrency, "--transport", "redis",
                       "--redis-url", server.url, "--worker-id", f"bench-{workers}-{i}")
            for i in range(workers)]
    try:
        _xadd(r, [echo_job(f"warm-{i:04d}") for i in range(WARMUP)])
        _poll(lambda: _settled(r) and not any(s.check() for s in sups), STALL, "the warm-up jobs")
        docs = [echo_job(f"bench-{i:06d}") for i in range(jobs)]
        start = time.monotonic()
        _xadd(r, docs)
        _poll(lambda: _settled(r) and not any(s.check() for s in sups), STALL * 5,
              "every message to be acknowledged")
        took = time.monotonic() - start
        done = sum(len(os.listdir(s.results)) for s in sups)
        if done != WARMUP + jobs:
            raise RuntimeError(f"{done} result files for {WARMUP + jobs} jobs")
        return took
    finally:
        for sup in sups:
            sup.stop()


def _xadd(r: redis.Redis, docs: list[bytes]) -> None:
    pipe = r.pipeline(transaction=False)
    for doc in docs:
        pipe.xadd(STREAM, {"job": doc})
    pipe.execute()


@contextlib.contextmanager
def workspace(parent: str | None) -> Iterator[Path]:
    """A temporary directory, removed at the end whatever happens."""
    path = Path(tempfile.mkdtemp(prefix="gkw-bench-redis-", dir=parent))
    path.chmod(0o755)  # jobs run as an unprivileged user when the bench runs as root
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Run every row, print the table, write the JSON; exit 0 when every row ran."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--jobs", type=int, default=500, help="jobs per row (default 500)")
    ap.add_argument("--workers", default="1,2", help="worker counts of the Redis rows (1,2)")
    ap.add_argument("--max-concurrent", type=int, default=4, help="slots per worker (4)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--dir", help="parent of the temporary directory")
    args = ap.parse_args(argv)
    if shutil.which("redis-server") is None:
        print("bench_redis: redis-server is missing (Debian package redis-server)", file=sys.stderr)
        return 2
    counts = [int(w) for w in args.workers.split(",") if w]
    rows: list[dict[str, Any]] = []
    with workspace(args.dir) as base:
        spool_s = spool_row(base, args.jobs, args.max_concurrent)
        rows.append({"transport": "spool", "workers": 1, "seconds": spool_s})
        server = RedisServer(base / "redis")
        try:
            for w in counts:
                rows.append({"transport": "redis", "workers": w,
                             "seconds": redis_row(base, server, args.jobs, w, args.max_concurrent)})
        finally:
            server.stop()
    for row in rows:
        row["jobs"] = args.jobs
        row["per_s"] = round(args.jobs / row["seconds"], 1)
        row["ratio_to_spool"] = round(spool_s / row["seconds"], 3)
        row["seconds"] = round(row["seconds"], 3)
    print(f"{args.jobs} echo jobs, {args.max_concurrent} slot(s) per worker, {os.cpu_count()} CPU(s)")
    print(f"{'transport':<10} {'workers':>7} {'seconds':>9} {'jobs/s':>9} {'vs spool':>9}")
    for row in rows:
        print(f"{row['transport']:<10} {row['workers']:>7} {row['seconds']:>9.2f} "
              f"{row['per_s']:>9.1f} {row['ratio_to_spool']:>8.2f}x")
    report = {"jobs": args.jobs, "max_concurrent": args.max_concurrent, "rows": rows,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "kernel": platform.release()}}
    if args.json:
        args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

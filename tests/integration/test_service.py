"""The supervisor as a service: sd_notify on a real socket, metrics and health, SIGHUP reload."""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Worker, job, wait_until

from worker import metrics


class NotifySocket:
    """A datagram socket standing where systemd's notify socket would."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(20)
        self.path = path

    def next(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def until(self, key: str) -> dict[str, str]:
        while True:
            msg = self.next()
            if key in msg:
                return msg


@pytest.fixture
def notify(tmp_path: Path):
    ns = NotifySocket(tmp_path / "notify.sock")
    yield ns
    ns.sock.close()


def test_ready_status_watchdog_and_stopping_reach_the_notify_socket(make_worker, notify) -> None:
    w = make_worker("--kill-grace", "1", env={"NOTIFY_SOCKET": str(notify.path),
                                              "WATCHDOG_USEC": "400000"})
    w.jobs.mkdir(parents=True)
    w.drop(job("before-ready"))
    w.start(wait_ready=False)
    first = notify.next()
    assert first["READY"] == "1"
    assert re.fullmatch(r"running \d/4, queued \d", first["STATUS"])
    assert (w.jobs / ".active").exists()  # READY came after the spool was set up and recovered
    assert "WATCHDOG" in notify.until("WATCHDOG")
    w.wait_result("before-ready")
    w.drop(job("slow", "test.sleep", {"seconds": 5}))
    wait_until(lambda: "[slow] running:" in w.log(), [w.jobs / ".status"], 20, "the slow job")
    while notify.until("STATUS")["STATUS"] != "running 1/4, queued 0":
        pass  # (an older STATUS may say so too: before-ready ran, but slow runs now)
    w.signal(signal.SIGTERM)
    stop = notify.until("STOPPING")
    assert stop["STOPPING"] == "1" and stop["STATUS"] == "draining: running 1/4, queued 0"
    assert "EXTEND_TIMEOUT_USEC" in notify.until("EXTEND_TIMEOUT_USEC")
    assert w.proc.wait(30) == 0


def _metrics_worker(make_worker) -> tuple[Worker, str, int]:
    w = make_worker("--metrics-addr", "127.0.0.1:0", "--kill-grace", "1").start()
    port = w.metrics_port()
    return w, "127.0.0.1", port


def test_metrics_move_as_jobs_run_and_promtool_accepts_them(make_worker, tmp_path) -> None:
    w, host, port = _metrics_worker(make_worker)
    _, before = metrics.fetch(host, port, "/metrics")
    assert b'guestkit_worker_info{worker_id="' in before
    w.drop(job("m1"))
    w.drop(job("m2", "test.raise", {"permanent": True}))
    for n in range(2):  # made-up operations: one series for them, whatever their names
        w.drop(job(f"m-op-{n}", f"acme.made-up-{n}"))
    w.drop(b"{not json", "m-bad.json")
    w.drop(job("m1"), "m1-again.json")  # a duplicate id
    for job_id in ("m1", "m2", "m-op-0", "m-op-1"):
        w.wait_result(job_id)
    wait_until(lambda: len(list((w.jobs / "rejected").glob("*.error.json"))) == 2,
               [w.jobs / "rejected"], 30, "two rejection records")
    code, body = metrics.fetch(host, port, "/metrics")
    text = body.decode()
    assert code == 200
    assert 'guestkit_worker_jobs_total{operation="system.echo",outcome="completed"} 1' in text
    assert 'guestkit_worker_jobs_total{operation="test.raise",outcome="EXECUTION_ERROR"} 1' in text
    assert ('guestkit_worker_jobs_total{operation="unknown",outcome="UNSUPPORTED_OPERATION"} 2'
            in text) and "acme." not in text
    assert "guestkit_worker_rejected_total 2\n" in text
    assert "guestkit_worker_spawn_latency_seconds_count 2" in text
    assert 'guestkit_worker_job_duration_seconds_count{operation="system.echo"} 1' in text
    promtool = shutil.which("promtool")
    if promtool:
        (tmp_path / "m.txt").write_bytes(body)
        check = subprocess.run([promtool, "check", "metrics"], stdin=(tmp_path / "m.txt").open(),
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr


def test_health_is_200_and_ready_turns_503_while_draining(make_worker) -> None:
    w, host, port = _metrics_worker(make_worker)
    assert metrics.fetch(host, port, "/healthz") == (200, b"ok\n")
    assert metrics.fetch(host, port, "/readyz")[0] == 200
    out = w.cli("health", "--metrics-addr", f"{host}:{port}")
    assert "healthz: 200 ok" in out.stdout and "readyz: 200" in out.stdout
    w.drop(job("long", "test.sleep", {"seconds": 30}))
    wait_until(lambda: (w.jobs / ".status" / "long.json").exists()
               and b"running" in (w.jobs / ".status" / "long.json").read_bytes(),
               [w.jobs / ".status"])
    w.signal(signal.SIGTERM)
    wait_until(lambda: "draining" in w.log(), [w.base], 10)
    code, body = metrics.fetch(host, port, "/readyz")
    assert (code, body.strip()) == (503, b"draining")
    assert w.cli("health", "--metrics-addr", f"{host}:{port}", check=False).returncode == 1
    w.signal(signal.SIGTERM)
    assert w.proc.wait(30) == 0


def test_a_busy_metrics_port_is_a_clear_startup_error(make_worker) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    w = make_worker("--metrics-addr", f"127.0.0.1:{taken.getsockname()[1]}")
    w.start(wait_ready=False)
    assert w.proc.wait(30) == 1
    assert (f"metrics address 127.0.0.1:{taken.getsockname()[1]}: Address already in use "
            "(another worker on this host? give each its own --metrics-addr host:port, or '' "
            "for none)") in w.log()
    taken.close()


def test_sighup_reloads_what_can_change_and_says_what_cannot(make_worker, tmp_path) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text("[worker]\nmax_concurrent = 1\n")
    w = make_worker(env={"GUESTKIT_WORKER_CONFIG": str(cfg)}).start()
    assert "1 slot(s)" in w.log()
    cfg.write_text("[worker]\nmax_concurrent = 3\nworker_id = 'renamed'\n"
                   f"image_roots = ['{tmp_path}']\nisolation = ['seccomp']\n"
                   "redis_group = 'others'\n")
    w.signal(signal.SIGHUP)
    wait_until(lambda: "reloaded settings: 3 slot(s)" in w.log(), [w.base], 10)
    assert ("reload: worker_id, image_roots, isolation, redis_group cannot change while "
            "running; restart to apply") in w.log()
    cfg.write_text("[worker]\nmax_concurrent = 'many'\n")
    w.signal(signal.SIGHUP)
    wait_until(lambda: "reload failed, keeping the current settings" in w.log(), [w.base], 10)
    w.drop(job("after-reload"))
    assert w.wait_result("after-reload")["status"] == "completed"


def test_health_with_a_jobs_dir_needs_a_supervisor_serving_it(make_worker) -> None:
    """Another worker answering at the address does not make an unserved spool healthy."""
    w, host, port = _metrics_worker(make_worker)
    other = w.base / "other" / "jobs"
    other.mkdir(parents=True)
    out = subprocess.run([sys.executable, "-m", "worker", "health", "--jobs-dir", str(other),
                          "--metrics-addr", f"{host}:{port}"],
                         capture_output=True, text=True, env=w.env, timeout=60)
    assert out.returncode == 1 and f"no supervisor serves {other}" in out.stderr, out.stderr
    assert w.cli("health", "--metrics-addr", f"{host}:{port}").returncode == 0

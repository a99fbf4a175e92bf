"""Fixtures that run a real supervisor process on a spool in tmp_path."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
from inotify_simple import INotify, flags

from worker import cgroups, isolation
from worker.config import Settings
from worker.spool import Spool

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = ROOT / "tests" / "plugins"
EXAMPLES = ROOT.parent / "shared" / "examples"
MKIMAGES = ROOT / "scripts" / "mkimages.sh"
FIXTURE_TOOLS = ("qemu-img", "sfdisk", "mkfs.vfat", "mcopy", "mke2fs", "mkfs.xfs")


@pytest.fixture(scope="session")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every fixture disk image, built once per session by scripts/mkimages.sh."""
    missing = [t for t in FIXTURE_TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"image tools missing: {missing}; install the Debian packages in "
                    "scripts/image-packages.txt")
    out = tmp_path_factory.mktemp("images")
    proc = subprocess.run(["bash", str(MKIMAGES), str(out)], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=300)
    assert proc.returncode == 0, f"mkimages.sh failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def job(job_id: str, operation: str = "system.echo", data: Any = None,
        payload_type: str | None = None, **execution: Any) -> dict[str, Any]:
    """A valid job document."""
    doc: dict[str, Any] = {
        "version": "1.0", "job_id": job_id, "kind": "VMOperation", "operation": operation,
        "payload": {"type": payload_type or f"{operation}.v1",
                    "data": {"n": job_id} if data is None else data},
    }
    if execution:
        doc["execution"] = execution
    return doc


def zygote(p: psutil.Process) -> bool:
    """One of the supervisor's zygotes (the lean forker, or the warm one)."""
    try:
        return p.name() in ("gkw-forker", "gkw-zygote")
    except psutil.NoSuchProcess:
        return False


def idle_spare(p: psutil.Process) -> bool:
    """A spare child still waiting for its job: it and its descendants are all named so."""
    try:
        return all(q.name() == "gkw-spare" for q in [p, *p.children(recursive=True)])
    except psutil.NoSuchProcess:
        return True


def idle_spares(pid: int, recursive: bool = True) -> list[int]:
    """Pids of the spares waiting below process `pid`, sorted (none when it has gone). A
    process that ends between the listing and the look is not one."""
    try:
        kids = psutil.Process(pid).children(recursive=recursive)
    except psutil.NoSuchProcess:
        return []
    found = []
    for k in kids:
        try:
            if k.name() == "gkw-spare" and idle_spare(k):
                found.append(k.pid)
        except psutil.NoSuchProcess:
            continue
    return sorted(found)


def wait_until(check: Callable[[], Any], watch: list[Path], timeout: float = 30.0,
               what: str = "condition") -> Any:
    """Return check()'s first truthy value, re-checking on each inotify event in `watch` dirs."""
    ino = INotify()
    try:
        for d in watch:
            d.mkdir(parents=True, exist_ok=True)
            ino.add_watch(str(d), flags.CREATE | flags.MOVED_TO | flags.CLOSE_WRITE | flags.DELETE
                          | flags.MOVED_FROM)
        end = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")
            ino.read(timeout=int(min(left, 1.0) * 1000))
    finally:
        ino.close()


class Worker:
    """A supervisor process on its own spool; everything it does is observable on disk."""

    def __init__(self, base: Path, extra_args: list[str], env: dict[str, str] | None) -> None:
        self.base = base
        self.jobs = base / "jobs"
        self.results = base / "results"
        self.work = base / "work"
        self.outputs = base / "outputs"
        self.log_path = base / "worker.log"
        self.extra_args = extra_args
        self.wrapper: list[str] = []  # a command the supervisor runs under (e.g. setpriv)
        base_env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        self.env = {**base_env, "PYTHONPATH": str(PLUGINS), "GUESTKIT_WORKER_CONFIG": "/dev/null",
                    "GUESTKIT_WORKER_METRICS_ADDR": "", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def args(self) -> list[str]:
        return ["--jobs-dir", str(self.jobs), "--results-dir", str(self.results),
                "--work-dir", str(self.work), "--output-dir", str(self.outputs)]

    def start(self, *more: str, wait_ready: bool = True) -> Worker:
        """Start the supervisor; return once its log says it is ready."""
        _open_for_job_user(self.base)  # another pytest run may have closed /tmp/pytest-of-*
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.wrapper, sys.executable, "-m", "worker", "supervise", *self.args(),
                 "--log-format",
                 "human", *self.extra_args, *more],
                stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.base,
            )
        if wait_ready:
            wait_until(lambda: self.proc.poll() is not None or "ready:" in self.log(),
                       [self.base], 30, "the worker to be ready")
            assert self.proc.poll() is None, self.log()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str, check: bool = True, input: str | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a client command against this spool (`env`: what the client's differs in)."""
        cmd, *rest = args
        proc = subprocess.run(
            [sys.executable, "-m", "worker", cmd, "--jobs-dir", str(self.jobs), "--results-dir",
             str(self.results), "--work-dir", str(self.work), *rest],
            capture_output=True, text=True, env={**self.env, **(env or {})}, input=input,
            timeout=120,
        )
        if check:
            assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc

    def drop(self, doc: dict[str, Any] | bytes, name: str | None = None) -> Path:
        """Write a job file elsewhere and rename it into the inbox (the atomic drop)."""
        data = doc if isinstance(doc, bytes) else orjson.dumps(doc)
        name = name or f"{doc['job_id']}.json"  # type: ignore[index]
        self.jobs.mkdir(parents=True, exist_ok=True)
        tmp = self.base / f".drop-{name}"
        tmp.write_bytes(data)
        os.rename(tmp, self.jobs / name)
        return self.jobs / name

    def result(self, job_id: str) -> dict[str, Any] | None:
        try:
            return orjson.loads((self.results / f"{job_id}-result.json").read_bytes())
        except FileNotFoundError:
            return None

    def wait_result(self, job_id: str, timeout: float = 30.0) -> dict[str, Any]:
        return wait_until(lambda: self.result(job_id), [self.results], timeout,
                          f"the result of {job_id}")

    def published(self) -> list[str]:
        """Names of the result files (not a writer's hidden temporary file)."""
        return [n for n in os.listdir(self.results)
                if n.endswith("-result.json") and not n.startswith(".")]

    def wait_results(self, count: int, timeout: float = 60.0) -> None:
        wait_until(lambda: len(self.published()) >= count, [self.results], timeout,
                   f"{count} results")

    def runs(self, job_id: str) -> list[str]:
        path = self.outputs / f"{job_id}.runs"
        return path.read_text().split("\n")[:-1] if path.exists() else []

    def children(self) -> list[psutil.Process]:
        """The job processes under the supervisor (its zygotes and idle spares are not jobs)."""
        assert self.proc is not None
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return [k for k in kids if not zygote(k) and not idle_spare(k)]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; return the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def metrics_port(self) -> int:
        """The port of a worker started with --metrics-addr host:0, from its log."""
        return int(re.search(r"metrics and health on http://[^:]+:(\d+)/", self.log())[1])

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)


def _open_for_job_user(path: Path) -> None:
    """Let the unprivileged job user traverse (not list) the test's directories, as in production."""
    for d in [path, *path.parents]:
        mode = d.stat().st_mode
        if not mode & 0o001:
            d.chmod((mode & 0o7777) | 0o001)


@pytest.fixture
def make_worker(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Build workers on the test's spool; any left running are stopped (killed if stuck)."""
    made: list[Worker] = []
    _open_for_job_user(tmp_path)
    # The spool lives outside pytest's base dir, which another pytest run may close (0700).
    base = scratch_dir()

    def make(*extra_args: str, env: dict[str, str] | None = None) -> Worker:
        w = Worker(base, list(extra_args), env)
        made.append(w)
        return w

    yield make
    stop_workers(made, base)


def spool_at(base: Path) -> Spool:
    """A spool set up under `base` (jobs, results, work and out dirs), served by no one."""
    spool = Spool(Settings(jobs_dir=base / "jobs", results_dir=base / "results",
                           work_dir=base / "work", output_dir=base / "out"))
    spool.setup()
    return spool


def scratch_dir() -> Path:
    """A fresh directory the job user may traverse, outside pytest's private base dir."""
    base = Path(tempfile.mkdtemp(prefix="gkw-test-"))
    base.chmod(0o711)
    return base


def stop_workers(made: list[Worker], base: Path) -> None:
    """Stop every worker still running (double SIGINT, then SIGKILL) and remove `base`."""
    for w in made:
        if w.proc is not None and w.proc.poll() is None:
            drains = w.log().count(": draining")
            w.proc.send_signal(signal.SIGINT)
            # The second only once the first was taken: a signal sent while the same one is
            # still pending is merged into it, and the drain would wait for running jobs.
            with contextlib.suppress(AssertionError):
                wait_until(lambda w=w, n=drains: w.log().count(": draining") > n
                           or w.proc.poll() is not None, [w.log_path.parent], 10, "the drain")
            w.proc.send_signal(signal.SIGINT)
            try:
                w.proc.wait(20)
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()
    remove_spool_cgroups(base / "jobs")
    shutil.rmtree(base, ignore_errors=True)


def spool_cgroups(jobs: Path) -> dict[str, Path]:
    """The parent cgroups a supervisor of the spool `jobs` makes, by hierarchy (where it may)."""
    name = isolation.cgroup_name(Settings(jobs_dir=jobs))
    h = cgroups.probe(name, dry=True)
    return {k: p for k, p in (("v2", h.v2), ("memory_v1", h.memory_v1), ("pids_v1", h.pids_v1))
            if p is not None and p.name == name}


def remove_spool_cgroups(jobs: Path) -> None:
    """Remove what a supervisor of `jobs` killed by a test (not stopped) left in its cgroups:
    test spools are never served again, so no later start would sweep it."""
    ours = {k: p for k, p in spool_cgroups(jobs).items() if p.exists()}
    if ours:  # a process still dying keeps its cgroup: it is left, as after a crash
        cgroups.remove_all(cgroups.Hierarchies(**ours, owned=list(ours.values())))


@pytest.fixture
def worker(make_worker: Callable[..., Worker]) -> Worker:
    """A running worker with 4 slots and short kill grace."""
    return make_worker("--kill-grace", "1").start()


def wait_gone(pids: list[int], timeout: float = 10.0, what: str = "processes to die") -> None:
    """Return once none of `pids` runs (zombies count as gone), woken by each one's pidfd."""
    end = time.monotonic() + timeout
    for pid in pids:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if not select.select([fd], [], [], max(0.0, end - time.monotonic()))[0]:
                raise AssertionError(f"timed out after {timeout} s waiting for {what} (pid {pid} runs)")
        finally:
            os.close(fd)


def no_process_left(pids: list[int]) -> bool:
    """True when none of `pids` is alive (zombies count as gone)."""
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


def select_sleep(seconds: float) -> None:
    """Let time pass for a behaviour that is about time itself (not synchronisation)."""
    select.select([], [], [], seconds)


class Disk:
    """A small tmpfs that can be filled to the last page and emptied again."""

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        self.ballast = mount / "ballast"

    def fill(self) -> None:
        fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 16, 1):
                try:
                    while True:
                        os.write(fd, bytes(size))
                except OSError as e:
                    assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)
        assert os.statvfs(self.mount).f_bavail == 0

    def free(self) -> None:
        os.unlink(self.ballast)


@contextlib.contextmanager
def small_disk(mount: Path, size: str = "16m") -> Iterator[Disk]:
    """A tmpfs of `size` mounted on the empty dir `mount` (needs root), removed after."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0711", "tmpfs", str(mount)],
                   check=True)
    try:
        yield Disk(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)
        shutil.rmtree(mount, ignore_errors=True)

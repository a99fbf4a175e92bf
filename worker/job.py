"""One job the supervisor knows: its record, its child process, kill escalation and its end."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from worker.cgroups import JobCgroup
from worker.child import ChildSpec, Order
from worker.errors import ErrorCode, ExitCode
from worker.fsutil import read_whole
from worker.progress import MessageReader, MessageTooLarge
from worker.sandbox import Limits
from worker.spare import Spare
from worker.states import JobState, advance
from worker.zygote import Zygote


@dataclass(slots=True)
class Job:
    """A claimed job: what the queue needs, and while it runs, its process."""

    job_id: str
    claimed: str  # file name under .active/ or .retry/
    where: str
    operation: str
    priority: int
    attempt: int
    max_attempts: int
    timeout: int
    deadline: float | None  # epoch seconds
    cancellable: bool
    idempotency_key: str | None
    asked_limits: dict[str, int] | None = None  # execution.limits as submitted
    state: JobState = JobState.QUEUED
    not_before: float = 0.0  # epoch seconds; retry back-off
    waiting_for: str | None = None
    queued_at: float = field(default_factory=time.time)
    observability: dict[str, Any] | None = None
    message_id: str | None = None  # the shared queue's id for a job that came from it
    run: Run | None = None

    def move(self, new: JobState) -> None:
        """Change state through the protocol's transition table."""
        self.state = advance(self.state, new)

    def status_doc(self, worker_id: str) -> dict[str, Any]:
        """The live status written to .status/<id>.json."""
        doc: dict[str, Any] = {
            "state": self.state.value, "operation": self.operation, "attempt": self.attempt,
            "max_attempts": self.max_attempts, "priority": self.priority, "worker_id": worker_id,
            "file": self.claimed,
        }
        if self.waiting_for:
            doc["waiting_for"] = self.waiting_for
        if self.not_before > time.time():
            doc["not_before"] = self.not_before
        if self.run:
            doc.update(pid=self.run.pid, progress=self.run.progress, stalled=self.run.stalled)
        return doc


@dataclass(slots=True)
class Run:
    """One execution of a job in a child process."""

    pid: int
    reader: MessageReader
    started: float  # monotonic
    started_wall: float
    deadline: float  # monotonic: wall-clock timeout
    cpu_limit: int
    memory_limit_mb: int
    limits: dict[str, int] = field(default_factory=dict)
    origin: int = 0  # pid of the zygote that forked it (which reports its exit)
    progress: dict[str, Any] = field(default_factory=dict)
    last_message: float = 0.0
    stalled: bool = False
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    kill_reason: str | None = None  # timeout | deadline | cancel | shutdown
    by_deadline: bool = False  # `deadline` is the job's execution.deadline, before its timeout
    kill_at: float | None = None  # monotonic time of the SIGKILL step
    killed: bool = False  # SIGKILL sent
    last_status: float = 0.0  # monotonic time of the last status write
    status_dirty: bool = False  # progress not yet in the status file
    status: int | None = None
    rusage: Any = None
    cgroup: JobCgroup | None = None
    cgroup_stats: dict[str, int] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)
    io_bytes: tuple[int, int] | None = None  # (read, write) from /proc when ended before reaping
    #: Its work dir, when the job is sealed (`Plan.sealed`): once it is reaped nothing of the
    #: job can reach the dir, which may then be recycled.
    workdir: str | None = None

    def signal_group(self, sig: int) -> None:
        """Send `sig` to the job's process group (its own session); a group already gone is fine."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:  # not yet its own session, or already gone
            if self.status is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, sig)

    def begin_kill(self, reason: str, grace: float, now: float) -> None:
        """TERM the whole job now and arm the KILL step; the first reason sticks."""
        if self.kill_reason is None:
            self.kill_reason = reason
        if self.kill_at is None:
            self.signal_group(signal.SIGTERM)
            self.kill_at = now + grace

    def kill_tree(self) -> None:
        """SIGKILL everything of the job: its process group and whatever is left in its cgroup."""
        self.signal_group(signal.SIGKILL)
        if self.cgroup is not None:
            self.cgroup.kill()

    def take_messages(self) -> list[dict[str, Any]]:
        """Read what the child sent; a line over the cap becomes the job's error."""
        try:
            return self.reader.read_available()
        except MessageTooLarge as e:
            self.error = {"code": ErrorCode.EXECUTION_ERROR.value, "message": str(e),
                          "retryable": False}
            self.begin_kill("oversize", 0.0, time.monotonic())
            return []


@dataclass(slots=True)
class Forking:
    """A job's child asked of a zygote, its pid not read yet (see `request_fork`)."""

    spec: ChildSpec
    zygote: Zygote
    token: int
    reader: int  # the read end of the child's pipe
    timeout: float
    now: float  # when its dispatch began


def request_fork(spec: ChildSpec, timeout: float, now: float, zygote: Zygote) -> Forking:
    """Ask `zygote` to fork a child for `spec` without waiting for it: `forked` gives its Run."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        token = zygote.request(spec, w)
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    return Forking(spec, zygote, token, r, timeout, now)


def forked(f: Forking) -> Run:
    """Wait for the pid of the child `f` asked for; its Run (OSError if it could not be forked)."""
    try:
        pid = f.zygote.await_pid(f.token)
    except BaseException:
        os.close(f.reader)
        raise
    plan = f.spec.plan
    run = _new_run(pid, f.reader, f.spec.message_cap, plan.limits, plan.cgroup, f.timeout, f.now,
                   f.zygote.pid)
    run.workdir = plan.workdir if plan.sealed else None
    return run


def hand_to(spare: Spare, order: Order, timeout: float, now: float) -> Run | None:
    """Give `order` to a waiting spare; its Run, or None when the spare could not take it."""
    if not spare.hand(order):
        return None
    fd, spare.messages = spare.messages, -1
    run = _new_run(spare.pid, fd, order.message_cap, order.limits, spare.cgroup, timeout, now,
                   spare.origin)
    run.workdir = order.workdir if spare.sealed else None
    return run


def _new_run(pid: int, fd: int, cap: int, limits: Limits, cgroup: JobCgroup | None,
             timeout: float, now: float, origin: int) -> Run:
    return Run(
        pid=pid, reader=MessageReader(fd, cap), started=now, started_wall=time.time(),
        deadline=now + timeout, cpu_limit=limits.cpu_seconds, memory_limit_mb=limits.memory_mb,
        last_message=now, cgroup=cgroup, limits=limits.as_dict(), origin=origin,
    )


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a run ended, in protocol terms."""

    status: str  # completed | failed | timeout | cancelled | requeue
    code: ErrorCode | None = None
    message: str = ""
    retryable: bool = False
    details: dict[str, Any] | None = None


def decide(run: Run) -> Outcome:
    """Name the end of a reaped run from its messages, exit status, rusage and kill reason."""
    cpu = _cpu_seconds(run)
    if run.kill_reason == "timeout":
        return Outcome("timeout", ErrorCode.TIMEOUT,
                       f"the job ran past its wall-clock limit of {run.deadline - run.started:.0f} s")
    if run.kill_reason == "deadline":
        return Outcome("failed", ErrorCode.DEADLINE_EXCEEDED,
                       f"its execution.deadline passed after {run.deadline - run.started:.0f} s "
                       "of running")
    if run.kill_reason == "cancel":
        return Outcome("cancelled", ErrorCode.CANCELLED, "the job was cancelled while running")
    if run.kill_reason == "shutdown":
        return Outcome("requeue", ErrorCode.WORKER_LOST, "interrupted by the worker's shutdown",
                       retryable=True)
    if run.error is not None:
        code = ErrorCode(run.error.get("code", "EXECUTION_ERROR"))
        details = {"traceback": run.error["traceback"]} if run.error.get("traceback") else None
        return Outcome("failed", code, str(run.error.get("message", "")),
                       bool(run.error.get("retryable")), details)
    status = run.status if run.status is not None else 0
    if os.WIFSIGNALED(status):
        return _signalled(os.WTERMSIG(status), cpu, run)
    exit_code = os.waitstatus_to_exitcode(status)
    if exit_code == ExitCode.OK and run.result is not None:
        return Outcome("completed")
    if exit_code == ExitCode.SANDBOX:
        return Outcome("failed", ErrorCode.INTERNAL,
                       "the job's sandbox could not be set up (see the job's stderr.log)", True)
    return Outcome("failed", ErrorCode.EXECUTION_ERROR,
                   f"the job process exited with status {exit_code} without sending a result", True)


def _signalled(sig: int, cpu: float, run: Run) -> Outcome:
    name = _signame(sig)
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= run.cpu_limit):
        return Outcome("failed", ErrorCode.CPU_LIMIT,
                       f"the job used its CPU limit of {run.cpu_limit} s ({cpu:.1f} s; {name})")
    oom = run.cgroup_stats.get("oom_kill", 0) > 0
    if sig == signal.SIGKILL and (oom or peak_mb(run) >= run.memory_limit_mb * 0.9):
        how = "the kernel's OOM killer ended it in its cgroup" if oom else "killed"
        return Outcome("failed", ErrorCode.MEMORY_LIMIT,
                       f"the job reached its memory limit of {run.memory_limit_mb} MiB "
                       f"(peak {peak_mb(run):.0f} MiB; {how})")
    if sig == signal.SIGSYS:
        return Outcome("failed", ErrorCode.KILLED,
                       "the job was killed by SIGSYS: it made a system call the seccomp "
                       "filter forbids (e.g. ptrace)")
    return Outcome("failed", ErrorCode.KILLED,
                   f"the job process was killed by signal {name} ({sig})", retryable=True)


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _cpu_seconds(run: Run) -> float:
    """CPU of the whole job: its cgroup's count where known (every process of it, reaped or
    not, and known before the exit is reaped), else wait4's rusage."""
    if "cpu_usec" in run.cgroup_stats:
        return run.cgroup_stats["cpu_usec"] / 1e6
    if run.rusage is not None:
        return float(run.rusage.ru_utime + run.rusage.ru_stime)
    return 0.0


def peak_mb(run: Run) -> float:
    """Peak memory of the job in MiB: its cgroup's peak where known, else wait4's max RSS."""
    if "memory_peak" in run.cgroup_stats:
        return run.cgroup_stats["memory_peak"] / (1 << 20)
    return float(run.rusage.ru_maxrss) / 1024 if run.rusage is not None else 0.0


def run_metrics(run: Run, now: float) -> dict[str, Any]:
    """The result's `metrics` section for a reaped run."""
    ru = run.rusage
    out: dict[str, Any] = {
        "peak_memory_mb": round(peak_mb(run), 2),
        "cpu_seconds": round(_cpu_seconds(run), 3),
        "wall_seconds": round(now - run.started, 4),
        "disk_read_bytes": int(ru.ru_inblock) * 512 if ru is not None else (run.io_bytes or (0, 0))[0],
        "disk_write_bytes": int(ru.ru_oublock) * 512 if ru is not None else (run.io_bytes or (0, 0))[1],
    }
    if run.cgroup_stats:
        out["cgroup"] = dict(run.cgroup_stats)  # memory_peak, oom_kill, pids_max_hit, cpu_usec
    return out


RETRYABLE = frozenset({ErrorCode.KILLED, ErrorCode.INTERNAL, ErrorCode.EXECUTION_ERROR,
                       ErrorCode.WORKER_LOST})


def storage_io(pid: int) -> tuple[int, int] | None:
    """Bytes `pid` (with its reaped children) read from and wrote to storage, or None."""
    try:
        text = read_whole(f"/proc/{pid}/io")
        fields = dict(line.split(b": ") for line in text.splitlines() if b": " in line)
        return int(fields[b"read_bytes"]), int(fields[b"write_bytes"])
    except (OSError, KeyError, ValueError):
        return None

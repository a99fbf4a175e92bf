"""Spares: job children forked and boxed before their job exists, so a job starts at once.

A child's outer box costs milliseconds that do not depend on the job: the fork itself,
joining the slot's cgroups (a migration waits for an RCU grace period, about 10 ms here,
unless another migration happened just before), the PID and network namespaces. A spare,
forked by the lean zygote, pays them ahead while its slot is idle, at a low priority, then
blocks reading its order pipe, boxed but for what depends on its job. Dispatch renames its
work dir to the job's and writes one order (job id, payload, limits, work dir, environment);
the spare sets its environment and rlimits, enforces its Landlock rules and runs the handler
as a freshly forked child would. A spare runs at most one job; closing its order pipe unused
makes it exit.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from worker import isolation
from worker.cgroups import JobCgroup
from worker.child import Order, encode_order
from worker.config import Settings
from worker.sandbox import Plan
from worker.workdirs import Workdirs
from worker.zygote import Zygote

log = logging.getLogger("guestkit.spare")

#: An order must fit in an empty pipe so that handing it over never blocks the loop.
ORDER_MAX = 60 * 1024
#: After this many spares in a row fail to box themselves, none is made for PAUSE seconds:
#: jobs are forked afresh meanwhile instead of a spare being forked and dying in a loop.
FAILURES_BEFORE_PAUSE = 3
PAUSE = 60.0


@dataclass(slots=True)
class Spare:
    """The supervisor's handle on one waiting spare."""

    pid: int
    orders: int  # write end of its order pipe (non-blocking)
    messages: int  # read end of the message pipe its job will write to
    cgroup: JobCgroup | None
    new_net: bool  # it sits in a fresh network namespace: only for jobs without network
    sealed: bool  # what its job used may serve a later one (`Plan.sealed`)
    scratch: Path  # the work dir it made while waiting (renamed to its job's)
    origin: int  # pid of the zygote that forked it
    started: bool = False  # its cgroup's start was marked once it was ready (`Spares.arrived`)

    def hand(self, order: Order) -> bool:
        """Give the spare its job: its work dir becomes the job's, then the order goes down its
        pipe. False when it cannot take it: the order is too big, the job's work dir exists
        (an earlier attempt's, which a fresh child reuses), or the spare is gone.

        On True the spare owns the job and the order pipe is closed.
        """
        data = encode_order(order)
        if len(data) > ORDER_MAX:
            return False
        try:
            os.rename(self.scratch, order.workdir)  # a non-empty dir there is never replaced
        except OSError:
            return False
        try:
            written = os.write(self.orders, data)
        except OSError:  # it died while waiting (reaped soon); the job's dir is made already
            return False
        if written != len(data):  # cannot happen for an empty pipe; the spare would misread
            self.retire()
            return False
        os.close(self.orders)
        self.orders = -1
        return True

    def retire(self) -> None:
        """No job for this spare: close its pipes (it exits on end of file)."""
        for fd in (self.orders, self.messages):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.orders = self.messages = -1

    def kill(self) -> None:
        """SIGKILL the spare's whole process group (its own session)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)


def request(base: Plan, zygote: Zygote) -> tuple[int, Spare]:
    """Ask `zygote` for a spare in `base`'s outer box; (token, its handle, pid still 0)."""
    orders_r, orders_w = os.pipe2(os.O_CLOEXEC)
    messages_r, messages_w = os.pipe2(os.O_CLOEXEC)
    try:
        token = zygote.spare(base, orders_r, messages_w)
    except BaseException:
        for fd in (orders_w, messages_r):
            os.close(fd)
        raise
    finally:
        os.close(orders_r)
        os.close(messages_w)
    os.set_blocking(orders_w, False)
    return token, Spare(0, orders_w, messages_r, base.cgroup, base.new_net, base.sealed,
                        Path(base.workdir), zygote.pid)


class Spares:
    """The spares of one supervisor: one per free slot, forked by the zygote, one job each."""

    def __init__(self, host: isolation.Host, workdirs: Workdirs) -> None:
        self.host = host
        self.workdirs = workdirs  # a blank dir becomes a spare's scratch dir
        self.zygote: Zygote | None = None  # the lean zygote that forks them
        self.waiting: list[Spare] = []
        self.coming: dict[int, Spare] = {}  # asked of the zygote, by token; no pid yet
        self.retired: dict[int, Spare] = {}  # told to exit, not yet reported ended
        self.cap = 0
        self.failures = 0  # spares in a row that failed to box themselves
        self.paused_until = 0.0  # monotonic time before which no spare is made
        self._seq = itertools.count()

    def pick(self, needs_network: bool) -> Spare | None:
        """A waiting spare that can run a job (one in a network namespace cannot need network)."""
        return next((s for s in self.waiting if _fits(s, needs_network)), None)

    def due(self, needs_network: bool) -> bool:
        """True when no spare waits for such a job but one is on its way (worth waiting for)."""
        return self.pick(needs_network) is None and any(
            _fits(s, needs_network) for s in self.coming.values())

    def taken(self, s: Spare) -> None:
        """`s` took its job: it is a job's process now, no longer a spare."""
        self.waiting.remove(s)

    def keep(self, settings: Settings, free_slots: int, draining: bool) -> None:
        """Have one spare per free slot, waiting or on its way. Retire them only on drain,
        `spares = false` or fewer slots: a spare outlives a busy spell. None is made beside a
        running job: its set-up would take CPU from that job (p99 latency 13-17 ms vs 20-24)."""
        paused = time.monotonic() < self.paused_until
        self.cap = 0 if draining or paused or not settings.spares or self.zygote is None \
            else settings.max_concurrent
        while len(self.waiting) > self.cap:
            self._retire(self.waiting.pop())
        while len(self.waiting) + len(self.coming) < min(self.cap, free_slots):
            assert self.zygote is not None
            base = isolation.spare_plan(self.host, settings, f"spare-{next(self._seq)}")
            self.workdirs.provide(Path(base.workdir))
            try:
                token, spare = request(base, self.zygote)
            except OSError as e:
                log.error("could not ask for a spare child: %s", e)
                if base.cgroup is not None and self.host.pool is not None:
                    self.host.pool.release(base.cgroup)
                return
            self.coming[token] = spare

    def arrived(self, token: int, pid: int) -> None:
        """The spare asked for with `token` is boxed and waits (the zygote reports it once
        the spare says so): keep it, and note its cgroup's counters, from which its job's
        accounting starts; or retire it when no free slot wants it."""
        s = self.coming.pop(token)
        s.pid = pid
        self.failures = 0
        if len(self.waiting) >= self.cap:
            self._retire(s)
            return
        self.waiting.append(s)
        if s.cgroup is not None:  # boxed and idle until its order: its job starts from here
            try:
                s.cgroup.mark_start()
            except OSError as e:  # marked when the job is handed over, then
                log.debug("could not note spare %d's cgroup counters: %s", pid, e)
            else:
                s.started = True

    def failed(self, token: int, why: str) -> None:
        """The spare asked for with `token` could not be forked, or died boxing itself."""
        s = self.coming.pop(token)
        log.error("no spare child: %s", why)
        s.retire()
        self._clean(s, gone=False)  # it may still be dying
        self.failures += 1
        if self.failures >= FAILURES_BEFORE_PAUSE:
            self.failures = 0
            self.paused_until = time.monotonic() + PAUSE
            log.warning("%d spare children in a row failed; jobs are forked afresh for %.0f s",
                        FAILURES_BEFORE_PAUSE, PAUSE)

    def ended(self, pid: int, status: int) -> bool:
        """Clean up after a spare that ended without a job; False when `pid` was not one."""
        s = self.retired.pop(pid, None)
        if s is None:
            s = next((x for x in self.waiting if x.pid == pid), None)
            if s is None:
                return False
            self.waiting.remove(s)
            s.retire()
            log.warning("spare child %d ended while waiting (status %d)", pid, status)
        if s.cgroup is not None:
            s.cgroup.kill()
        self._clean(s)
        return True

    def lost(self) -> None:
        """The zygote died and every spare with it: forget them all."""
        for s in [*self.waiting, *self.coming.values(), *self.retired.values()]:
            s.retire()
            if s.cgroup is not None:
                s.cgroup.kill()
            self._clean(s, gone=False)
        self.waiting, self.coming, self.retired = [], {}, {}

    def close(self) -> None:
        """Kill every spare (the supervisor is stopping)."""
        for s in [*self.waiting, *self.retired.values()]:
            s.retire()
            s.kill()
        for s in self.coming.values():
            s.retire()

    def _retire(self, s: Spare) -> None:
        s.retire()
        self.retired[s.pid] = s

    def _clean(self, s: Spare, gone: bool = True) -> None:
        """Give back its cgroup and its dir: kept blank when `gone` (it was reaped, or never
        forked), removed while it may still be dying."""
        if s.cgroup is not None and self.host.pool is not None:
            self.host.pool.release(s.cgroup)
        if not (gone and self.workdirs.recycle(s.scratch)):
            shutil.rmtree(s.scratch, ignore_errors=True)


def _fits(s: Spare, needs_network: bool) -> bool:
    return not (s.new_net and needs_network)

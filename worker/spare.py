"""Spares: job children forked and boxed before their job exists, so a job starts at once.

A child's outer box costs milliseconds that do not depend on the job: the fork itself,
joining the slot's cgroups (a migration waits for an RCU grace period, about 10 ms here,
unless another migration happened just before), the PID and network namespaces. A spare
pays them while its slot is idle, then blocks reading its order pipe. Dispatch writes one
order (job id, payload, limits, work dir, environment) and the spare applies the inner box
(stdio, rlimits, user, NO_NEW_PRIVS, Landlock, seccomp) and runs the handler exactly as a
freshly forked child would. A spare runs at most one job; closing its order pipe unused
makes it exit.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import shutil
import signal
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from handlers.base import Handler
from worker import isolation, signals
from worker.cgroups import JobCgroup
from worker.child import Order, encode_order, run_spare
from worker.config import Settings
from worker.sandbox import Plan, fork_job

log = logging.getLogger("guestkit.spare")

#: An order must fit in an empty pipe so that handing it over never blocks the loop.
ORDER_MAX = 60 * 1024


@dataclass(slots=True)
class Spare:
    """The supervisor's handle on one waiting spare."""

    pid: int
    orders: int  # write end of its order pipe (non-blocking)
    messages: int  # read end of the message pipe its job will write to
    cgroup: JobCgroup | None
    new_net: bool  # it sits in a fresh network namespace: only for jobs without network
    scratch: Path  # the work dir it made while waiting (renamed to its job's)

    def hand(self, order: Order) -> bool:
        """Give the spare its job; False when it cannot take it (gone, or the order too big).

        On True the spare owns the job and the order pipe is closed; on False nothing changed.
        """
        data = encode_order(order)
        if len(data) > ORDER_MAX:
            return False
        try:
            written = os.write(self.orders, data)
        except OSError:  # it died while waiting (reaped soon) or its pipe is full
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


def fork(base: Plan, handlers: Mapping[str, Handler]) -> Spare:
    """Fork a spare that enters `base`'s outer box and waits for its order."""
    orders_r, orders_w = os.pipe2(os.O_CLOEXEC)
    messages_r, messages_w = os.pipe2(os.O_CLOEXEC)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        with signals.blocked():
            pid = fork_job(base.pid_ns)
            if pid == 0:
                os.close(orders_w)
                os.close(messages_r)
                run_spare(base, handlers, orders_r, messages_w)
    except BaseException:
        for fd in (orders_w, messages_r):
            os.close(fd)
        raise
    finally:
        os.close(orders_r)
        os.close(messages_w)
    os.set_blocking(orders_w, False)
    return Spare(pid, orders_w, messages_r, base.cgroup, base.new_net, base.workdir)


class Spares:
    """The spares of one supervisor: at most one per free slot, each handed one job."""

    def __init__(self, host: isolation.Host, handlers: Mapping[str, Handler]) -> None:
        self.host = host
        self.handlers = handlers
        self.waiting: list[Spare] = []
        self.retired: dict[int, Spare] = {}  # told to exit, not yet reaped
        self._seq = itertools.count()

    def pick(self, needs_network: bool) -> Spare | None:
        """A waiting spare that can run a job (one in a network namespace cannot need network)."""
        return next((s for s in self.waiting if not (s.new_net and needs_network)), None)

    def taken(self, s: Spare) -> None:
        """`s` took its job: it is a job's process now, no longer a spare."""
        self.waiting.remove(s)

    def keep(self, settings: Settings, free_slots: int, draining: bool) -> None:
        """Fork spares up to the free slots; retire them only on drain, `spares = false` or
        fewer slots (a spare outlives a busy spell in which fresh forks fill its slot)."""
        cap = 0 if draining or not settings.spares else settings.max_concurrent
        while len(self.waiting) > cap:
            s = self.waiting.pop()
            s.retire()
            self.retired[s.pid] = s
        while len(self.waiting) < min(cap, free_slots):
            base = isolation.spare_plan(self.host, settings, f"spare-{next(self._seq)}")
            try:
                self.waiting.append(fork(base, self.handlers))
            except OSError as e:
                log.error("could not fork a spare child: %s", e)
                self._release(base.cgroup)
                return

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
        self._release(s.cgroup)
        shutil.rmtree(s.scratch, ignore_errors=True)
        return True

    def close(self) -> None:
        """Kill every spare (the supervisor is stopping)."""
        for s in [*self.waiting, *self.retired.values()]:
            s.retire()
            s.kill()

    def _release(self, cg: JobCgroup | None) -> None:
        if cg is not None and self.host.pool is not None:
            self.host.pool.release(cg)

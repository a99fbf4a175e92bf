"""The event loop: claim from the spool, fill slots with sandboxed children, drive states, drain."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import math
import os
import select
import selectors
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from handlers.base import Handler
from worker import cgroups, isolation, memory, routing, sandbox
from worker.backlog import Backlog, Entry
from worker.child import ChildSpec, Order
from worker.config import RESTART_ONLY, Settings
from worker.errors import ErrorCode, JobRejected, UnsafeFile
from worker.fsutil import printable
from worker.intake import Accepted, Intake, Seen
from worker.job import (
    RETRYABLE,
    Forking,
    Job,
    Outcome,
    Run,
    decide,
    forked,
    hand_to,
    request_fork,
    run_metrics,
    storage_io,
)
from worker.logs import setup_logging
from worker.registry import Registry
from worker.results import Ending, build
from worker.service import Service
from worker.shortage import NoRoom, Shortage, room
from worker.signals import SignalPipe
from worker.spare import Spares
from worker.spec import JobDocument, loads, parse_job
from worker.spool import ACTIVE, RETRY, Spool, job_name
from worker.states import JobState
from worker.transports import Remote
from worker.watch import Watch
from worker.workdirs import Workdirs
from worker.zygote import Zygote

log = logging.getLogger("guestkit.supervisor")

#: A queue that held this many jobs gives its memory back when it empties.
COMPACT_AFTER = 1000

ZYGOTE_PAUSE_MAX = 60.0  #: longest pause before starting a zygote after one that failed
#: A zygote that dies sooner than this after it got ready failed as one that never got ready.
ZYGOTE_STEADY = 10.0
HOUSEKEEPING = 1.0  #: longest the loop sleeps: retries, deadlines and waiting jobs are checked
STOP_REAP = 2.0  #: longest a stop waits for killed spares and zygotes to leave their cgroups
STATUS_EVERY = 0.25  #: at most this often a running job's progress is written to its status


class Supervisor:
    """Owns the spool, the job table and every child; single-threaded."""

    def __init__(self, settings: Settings, registry: Registry, version: str,
                 reload: Callable[[], Settings] | None = None, remote: Remote | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.version = version
        self.reload_settings = reload
        self.spool = Spool(settings)
        self.jobs: dict[str, Job] = {}
        self.running: dict[int, Job] = {}
        #: jobs whose child a zygote forks while this loop pass goes on (see `_await_forks`)
        self.forking: list[tuple[Job, Forking]] = []
        self.ready: list[tuple[int, int, str]] = []  # (-priority, seq, job_id)
        self.retries: list[tuple[float, str]] = []  # (not_before epoch, job_id)
        self.key_waiters: dict[str, list[str]] = {}
        self.waiting: set[str] = set()
        #: jobs from the shared queue that no live worker could take: job id -> why not here
        self.unroutable: dict[str, str] = {}
        self._peers_seen = 0  # the remote's peers_seen when they were last offered
        self.draining = False
        self.drain_deadline: float | None = None
        self.to_archive: list[tuple[Job, bool, str]] = []  # ended; archived once results are synced
        #: a full disk under the spool: results held in memory until they can be written
        self.shortage: Shortage[tuple[Job, bool, str]] = Shortage()
        self._seq = itertools.count()
        self.held = 0  # most jobs held at once since the queue was last empty
        self.sel = selectors.DefaultSelector()
        self.backlog = Backlog()  # queued beyond queue_window: held by their files
        self.service = Service(settings, version)
        self.intake = Intake(self.spool, registry, settings, version, self._known,
                             self.service.m.rejected.inc)
        self.remote = remote or Remote()
        self.service.ready_check = self._readiness
        #: by zygote name: how many in a row exited before they were ready, and when
        #: (monotonic) the next may start
        self.zygote_failures: dict[str, int] = {}
        self.zygotes_due: dict[str, float] = {}
        self.zygote_waiters: dict[str, list[str]] = {}  # jobs held back for that zygote
        self.forker: Zygote | None = None  # forks spares and plain jobs
        self.zygote: Zygote | None = None  # jobs of handlers with a prepare() or a payload model
        #: pid -> (its zygote, its work dir to recycle once reaped): processes of jobs that
        #: ended on their result, not yet reaped
        self.lingering: dict[int, tuple[int, str | None]] = {}
        self._premake_failed = False  # said once until it works again
        self._next_look = 0.0  # when inbox files a writer held open are looked at again

    # -- life cycle ------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until drained; return the process exit code."""
        self._start()
        try:
            while not self._drained():
                self._tick()
        finally:
            self._stop()
        log.info("drained: no job running; exiting")
        return 0

    def _drained(self) -> bool:
        """Draining and nothing runs; results not yet durable for lack of space get until the
        drain's deadline to find room."""
        if not self.draining or self.running:
            return False
        owed = self.shortage.held or self.to_archive or self.spool.unsynced
        return not owed or time.monotonic() >= (self.drain_deadline or 0.0)

    def _start(self) -> None:
        self.spool.setup()
        self.spool.lock()
        sandbox.become_subreaper()
        self.host = isolation.probe(self.settings)
        self.workdirs = Workdirs(self.spool.work, self.host.uid, self.host.gid)
        self.spares = Spares(self.host, self.workdirs)
        if self.host.cgroups is not None and (n := cgroups.sweep(self.host.cgroups)):
            log.warning("removed %d job cgroup(s) left by a previous run", n)
        isolation.open_output_dir(self.host, self.settings.output_dir.absolute())
        isolation.check_reachable(self.host, self.spool.work, self.settings.output_dir)
        log.info("isolation: %s", ", ".join(self.host.layers()))
        for note in self.host.notes:
            log.info("isolation: %s", note)
        s = self.settings  # relative ones are the current directory's: say where they are
        log.info("directories: jobs %s, results %s, work %s, outputs %s", s.jobs_dir.absolute(),
                 s.results_dir.absolute(), s.work_dir.absolute(), s.output_dir.absolute())
        for operation, why in sorted(self.registry.unavailable.items()):
            log.warning("operation %s is not available here (its jobs fail "
                        "UNSUPPORTED_OPERATION): %s", operation, why)
        self.signals = SignalPipe()
        self.sel.register(self.signals, selectors.EVENT_READ, self._on_signals)
        self.watch = Watch()
        self.watch.add("inbox", self.spool.inbox)
        self.watch.add("cancel", self.spool.cancel_dir)
        self.sel.register(self.watch, selectors.EVENT_READ, self._on_watch)
        self._start_zygotes()
        self.service.open(self.sel, self._gauges)
        self.spool.sweep_tmp()
        for job_id in self.spool.sweep_results():
            log.warning("job %r: its result, written but not yet under its name when the last "
                        "run stopped, is there now", job_id,
                        extra={"job_id": job_id, "worker_id": self.settings.worker_id})
        self.workdirs.open()
        frozen = memory.freeze_startup()  # before any job: jobs come and go, and are collected
        log.debug("start-up: %d objects exempt from garbage collection", frozen)
        self._recover()
        self._scan()
        self._sync_results()  # the queue's own recovery reads them from their files
        self.remote.open(self.sel, self._deliver, self._on_cancel, self.intake.profile.to_json())
        self.service.ready(self._status_text())
        log.info("ready: worker %s, pool %s, %d slot(s), spool %s, %d job(s) queued",
                 self.settings.worker_id, self.settings.pool, self.settings.max_concurrent,
                 self.spool.inbox, len(self.jobs))

    def _start_zygotes(self) -> None:
        """The lean forker always; a warm zygote for handlers that need one (`needs_warmth`)."""
        handlers = self.registry.handlers
        now = time.monotonic()
        for name in [n for n, due in self.zygotes_due.items() if due <= now]:
            del self.zygotes_due[name]
        if self.forker is None and "gkw-forker" not in self.zygotes_due:
            plain = {op: h for op, h in handlers.items() if not self.registry.needs_warmth(h)}
            self.forker = self._start_zygote("gkw-forker", plain, prepare=False)
            log.info("forker %d forks jobs and spares", self.forker.pid)
        warm = {op: h for op, h in handlers.items() if self.registry.needs_warmth(h)}
        if warm and self.zygote is None and "gkw-zygote" not in self.zygotes_due:
            self.zygote = self._start_zygote("gkw-zygote", warm, prepare=True)
            log.info("zygote %d warms %s", self.zygote.pid,
                     ", ".join(h.name for h in self.registry.warm_handlers()))

    def _start_zygote(self, name: str, handlers: Mapping[str, Handler], prepare: bool) -> Zygote:
        z = Zygote(name, handlers, prepare, self.host.runtime, self.host.landlock_abi,
                   (self.host.seccomp, self.host.seccomp_sealed))
        z.start()
        self.sel.register(z.fileno(), selectors.EVENT_READ, lambda: self._on_zygote(z))
        return z

    def _on_zygote(self, z: Zygote) -> None:
        """Act on what a zygote reports: spares forked (or not), children ended."""
        if z.sock is None:  # reaped and replaced earlier in this pass: nothing more to read
            return
        try:
            reports = z.reports()
        except OSError:
            reports = []  # it died: its exit is reaped here
        for kind, *rest in reports:
            if kind == "exited":
                pid, status, rusage = rest
                if not self.spares.ended(pid, status):
                    self._ended(pid, status, rusage)
            elif kind == "spawned":
                self.spares.arrived(rest[0], rest[1])
            elif kind == "failed":
                self.spares.failed(rest[0], rest[1])
            elif kind == "ready":
                self._zygote_ready(z)
                log.debug("%s %d ready: its children skip %d at-fork hook(s) that reset other "
                          "threads' locks", z.name, z.pid, rest[0])

    def _zygote_died(self, z: Zygote, status: int) -> None:
        """Its children died with it (PDEATHSIG): end their runs as killed, start a new one;
        after a pause that doubles while each dies before it was ready, soon after or hung
        (jobs wait), so that one dying or hanging on every fork is not restarted in a loop."""
        lived = time.monotonic() - z.ready_at if z.ready else 0.0
        steady = z.ready and lived >= ZYGOTE_STEADY and not z.hung
        code = os.waitstatus_to_exitcode(status)
        if steady:
            self.zygote_failures.pop(z.name, None)
            log.error("%s %d died; its children were killed; starting a new one", z.name, z.pid)
        else:
            failures = self.zygote_failures[z.name] = self.zygote_failures.get(z.name, 0) + 1
            pause = min(ZYGOTE_PAUSE_MAX, 2.0 ** min(failures - 1, 16))
            self.zygotes_due[z.name] = time.monotonic() + pause
            if z.hung:
                log.error("%s %d was killed for not answering a fork; its children were "
                          "killed; starting another in %.0f s, jobs wait for it", z.name, z.pid,
                          pause)
            elif z.ready:
                log.error("%s %d died %.1f s after it got ready (status %d); its children were "
                          "killed; starting another in %.0f s, jobs wait for it", z.name, z.pid,
                          lived, code, pause)
            else:
                log.error("%s %d exited before it was ready (status %d; its error is above); "
                          "starting another in %.0f s, jobs wait for it", z.name, z.pid, code,
                          pause)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(z.fileno())
        z.close()
        if z is self.forker:
            self.forker = self.spares.zygote = None
            self.spares.lost()
        else:
            self.zygote = None
        for pid in [p for p, (origin, _) in self.lingering.items() if origin == z.pid]:
            del self.lingering[pid]
        for pid, job in list(self.running.items()):
            if job.run is not None and job.run.origin == z.pid:
                self._ended(pid, signal.SIGKILL, None)
        if steady:
            self._start_zygotes()

    def _stop(self) -> None:
        for z in (self.forker, self.zygote):
            if z is not None:
                z.close()
        self.spares.close()
        try:
            self._archive_ended()
        except OSError as e:  # its jobs stay claimed: recovery decides after the restart
            log.error("could not make the last results durable: %s", e)
        if unarchived := len(self.shortage.held) + len(self.to_archive):
            log.error("stopping with %d ended job(s) not archived for lack of space (the results "
                      "of %d not durable); their files stay claimed, and the next start settles "
                      "them as after a crash", unarchived,
                      len(self.shortage.held) + self.spool.unsynced)
        self._remove_cgroups()
        self.remote.close()
        self.service.close()
        with contextlib.suppress(Exception):
            self.watch.close()
        self.signals.close()
        self.sel.close()

    def _remove_cgroups(self) -> None:
        """Stopping: remove this spool's cgroups as the processes just killed are reaped."""
        h = self.host.cgroups
        if h is None:
            return
        deadline = time.monotonic() + STOP_REAP
        woken = select.poll()  # a SIGCHLD wakes it (not select(): fds may be above 1023)
        woken.register(self.signals, select.POLLIN)
        while True:
            for _ in sandbox.reaped():
                pass
            if cgroups.remove_all(h):
                return
            wait = deadline - time.monotonic()
            if wait <= 0 or not woken.poll(wait * 1000):
                log.warning("cgroups below %s are still held by dying processes; the next start "
                            "removes them", ", ".join(str(p) for p in h.owned) or "the unit")
                return
            self.signals.drain()

    def _tick(self) -> None:
        for key, _ in self.sel.select(self._timeout()):
            key.data()
        for z in (self.forker, self.zygote):
            if z is not None and z.pending:  # read while it waited for a job's fork
                self._on_zygote(z)
        now = time.monotonic()
        self._enforce(now)
        self._housekeep()
        try:
            self._fill_slots(now)
            self._archive_ended()  # while the zygotes fork what _fill_slots asked for
            self._premake_result()
        finally:
            self._await_forks()
        self.spares.keep(self.settings, self.settings.max_concurrent - len(self.running),
                         self.draining)
        free = self.settings.max_concurrent - len(self.running) - len(self.ready)
        self.remote.poll(now, 0 if self.draining or self.shortage.active else max(0, free),
                         [j.message_id for j in self.running.values() if j.message_id])
        if self.unroutable and self.remote.peers_seen != self._peers_seen and not self.draining:
            self._pass_on_waiting()
        self.service.heartbeat(now, self._status_text())

    def _premake_result(self) -> None:
        try:
            self.spool.premake_result()
        except OSError as e:  # the next result is made on the spot, as without it
            if not self._premake_failed:
                log.warning("could not make the file for the next result ahead: %s", e)
            self._premake_failed = True
        else:
            self._premake_failed = False

    def _status_text(self) -> str:
        queued = len(self.jobs) - len(self.running) + len(self.backlog)
        text = f"running {len(self.running)}/{self.settings.max_concurrent}, queued {queued}"
        text += self._shortage_text()
        return f"draining: {text}" if self.draining else text

    def _readiness(self) -> tuple[bool, str]:
        if self.shortage.active:
            return False, "no space left on the spool's disk: no job is taken or started"
        return self.remote.healthy()

    def _gauges(self) -> None:
        """Refresh the gauges a scrape reads."""
        m = self.service.m
        m.running_jobs.set(len(self.running))
        waiting = [j for j in self.jobs.values() if j.run is None]
        m.queue_depth.set(len(waiting) + len(self.backlog))
        oldest = min((j.queued_at for j in waiting), default=None)
        if (name := self.backlog.oldest()) is not None and name[:20].isdigit():
            oldest = min(oldest or math.inf, int(name[:20]) / 1e9)  # claimed: time_ns first
        m.oldest_queued_age.set(time.time() - oldest if oldest else 0.0)

    def _timeout(self) -> float:
        if (self.to_archive or self.spool.unsynced) and not self.shortage.active:
            return 0.0  # a job ended after this pass made its results durable
        now = time.monotonic()
        nearest = now + HOUSEKEEPING
        if self.shortage.active:
            nearest = min(nearest, self.shortage.next_try)
        for other in (self.service.next_deadline(), self.remote.next_deadline()):
            if other is not None:
                nearest = min(nearest, other)
        for job in self.running.values():
            run = job.run
            assert run is not None
            nearest = min(nearest, run.kill_at or run.deadline)
            if run.status_dirty:
                nearest = min(nearest, run.last_status + STATUS_EVERY)
        if self.drain_deadline is not None:
            nearest = min(nearest, self.drain_deadline)
        return max(0.0, nearest - now)

    # -- events ------------------------------------------------------------------------------

    def _on_signals(self) -> None:
        for sig in self.signals.drain():
            if sig == signal.SIGCHLD:
                self._reap()
            elif sig in (signal.SIGTERM, signal.SIGINT):
                self._begin_drain(signal.Signals(sig).name)
            elif sig == signal.SIGHUP:
                self._reload()
            elif sig == signal.SIGUSR1:
                self._dump()

    def _on_watch(self) -> None:
        for change in self.watch.read():
            if change.where == "cancel":
                self._on_cancel(change.name)
            elif not self.draining and not self.shortage.active and job_name(change.name):
                self._take(change.name, "created" if change.created else "closed")
        if self.watch.overflowed:
            self.watch.overflowed = False
            log.warning("inotify queue overflowed; rescanning the inbox")
            self._scan()

    def _scan(self) -> None:
        """Take every job file in the inbox (not while space is short: its end scans again),
        and every cancel request."""
        for name in [] if self.shortage.active else self.spool.each_inbox_name():
            if self.shortage.active:  # found while taking an earlier file
                break
            self._take(name, "scanned")
        for name in os.listdir(self.spool.cancel_dir):
            self._on_cancel(name)

    def _take(self, name: str, seen: Seen) -> None:
        try:
            accepted = self.intake.take(name, seen)
        except OSError as e:  # never let one file stop the loop
            log.error("could not take %s from the inbox: %s", printable(name), e)
            self.shortage.noted(f"taking job file {printable(name)}", e)  # taken again then
            return
        except Exception:
            # A fault of ours. The file stays in the inbox, or in .active/ once claimed,
            # where the next start recovers it.
            log.exception("could not take %s from the inbox", printable(name))
            return
        if accepted is not None:
            self._admit(accepted)

    def _deliver(self, message_id: str, data: bytes, running_attempt: int | None) -> None:
        """A job from the shared queue: keep a durable local copy, then admit it like a drop."""
        try:
            claimed = self.spool.materialize(message_id, data)
        except OSError as e:
            self.shortage.noted(f"storing message {message_id}", e)
            raise
        if running_attempt is not None:
            self._recover_one(ACTIVE, claimed, data, None, running_attempt, message_id)
            return
        try:
            acc = self.intake.admit(ACTIVE, claimed, data, f"message {message_id}")
        except OSError as e:  # the message is delivered again: keep no copy of it
            if self.shortage.noted(f"taking message {message_id}", e):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.spool.path(ACTIVE, claimed))
            raise
        if acc is None:
            self._reject_message(message_id)
            return
        acc.job.message_id = message_id
        self._admit(acc)

    def _admit(self, acc: Accepted, seq: int | None = None) -> None:
        """Take a valid job into the queue; `seq`: its rank kept in the backlog (no new log)."""
        job = acc.job
        if acc.ending is None and job.waiting_for and job.message_id and self._pass_on(job, acc.doc):
            return  # a queue's job this worker cannot take: it went to one that can
        job.observability = acc.doc.observability.model_dump() if acc.doc.observability else None
        self.jobs[job.job_id] = job
        self.held = max(self.held, len(self.jobs) + len(self.backlog))
        if acc.ending is not None:
            self._conclude(job, acc.ending)
            return
        if self.spool.cancel_requested(job.job_id):
            if job.cancellable:
                self._cancel_queued(job)
                return
            self._refuse_cancel(job)  # asked before it arrived
        if seq is None:
            self._log(job, "queued: %s, priority %d, attempt %d/%d", job.operation, job.priority,
                      job.attempt, job.max_attempts)
        if job.waiting_for:
            self._wait(job, job.waiting_for)
        elif job.not_before > time.time():
            heapq.heappush(self.retries, (job.not_before, job.job_id))
            self._write_status(job)
        else:
            self._enqueue(job, seq)

    def _enqueue(self, job: Job, seq: int | None = None) -> None:
        """Ready to run: no status file is needed (a claimed file without one is queued).
        Beyond `queue_window` a new arrival waits in the backlog, held by its file alone."""
        if seq is not None:  # back from the backlog, its status as it was
            heapq.heappush(self.ready, (-job.priority, seq, job.job_id))
            return
        seq = next(self._seq)
        if job.attempt > 1 or self.spool.has_status(job.job_id):
            self._write_status(job)  # replace a stale waiting/retry status
        if (len(self.ready) >= self.settings.queue_window and job.where == ACTIVE and job.message_id is None
                and self.backlog.add(job.job_id, job.claimed, job.priority, seq,
                                     job.attempt if job.attempt > 1 else None)):
            del self.jobs[job.job_id]
            return
        heapq.heappush(self.ready, (-job.priority, seq, job.job_id))

    def _known(self, job_id: str) -> bool:
        """Whether a job with this id is queued, waiting or running here."""
        return job_id in self.jobs or job_id in self.backlog or job_id in self.shortage.held_ids

    def _promote_front(self) -> None:
        """Bring the backlog's front job into the heap while it ranks ahead of the heap's."""
        while (best := self.backlog.best()) is not None and (
                not self.ready or best < self.ready[0][:2]):
            entry = self.backlog.pop()
            assert entry is not None
            self._promote(entry)

    def _promote(self, entry: Entry) -> None:
        """Read a backlog job back from its claimed file and admit it with its rank."""
        try:
            data = self.spool.read(ACTIVE, entry.claimed)
        except OSError as e:
            log.error("job %r: its claimed file %s could not be read back (%s); it is not run",
                      entry.job_id, entry.claimed, e)
            return
        acc = self.intake.admit(ACTIVE, entry.claimed, data, entry.claimed, attempt=entry.attempt)
        if acc is not None:
            self._admit(acc, seq=entry.seq)

    def _pass_on(self, job: Job, doc: JobDocument) -> bool:
        """Pass on a job from the shared queue that this worker cannot take (`job.waiting_for`):
        to the queue of the pool its routing names, else to a live worker that can take it.
        True when it went, its local copy dropped; else its wait reason also says why no
        other live worker can take it."""
        why = self.unroutable.pop(job.job_id, None) or job.waiting_for or ""

        def fits(profile: dict[str, Any]) -> str | None:
            peer = routing.Profile.from_json(profile)
            if peer is None:
                return f"worker {profile.get('worker_id')!r} shows a profile this one cannot read"
            return routing.unsatisfied(doc, peer, f"worker {peer.worker_id!r}")

        shared = {k: v for k, v in job.status_doc(self.settings.worker_id).items()
                  if k not in ("file", "waiting_for", "worker_id")}
        shared["detail"] = f"passed on by {self.settings.worker_id!r}: {why}"
        assert job.message_id is not None
        pool = doc.routing.worker_pool
        if pool and pool != self.settings.pool and self.remote.forward(job.message_id, pool, shared):
            self._log(job, "moved to the queue of pool %s", pool)
            self.service.m.passed_on.labels(to="pool").inc()
        else:
            to, others = self.remote.offer(job.message_id, fits, shared)
            if to is None:
                self.unroutable[job.job_id] = why
                job.waiting_for = why + (f"; no other live worker can take it either "
                                         f"({'; '.join(others.values())})" if others else "")
                return False
            self._log(job, "handed to worker %s, as %s", to, why)
            self.service.m.passed_on.labels(to="worker").inc()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.spool.path(job.where, job.claimed))
        if self.spool.has_status(job.job_id):
            self.spool.remove_status(job.job_id)
        return True

    def _pass_on_waiting(self) -> None:
        """The pool's live workers changed: offer the jobs none of them could take again."""
        self._peers_seen = self.remote.peers_seen
        for job_id in list(self.unroutable):
            job = self.jobs.get(job_id)
            if job is None or job.state is not JobState.QUEUED or not job.waiting_for:
                del self.unroutable[job_id]
                continue
            try:
                doc, _ = parse_job(self.spool.read(job.where, job.claimed), job.claimed)
            except (OSError, JobRejected) as e:
                log.error("job %r: its claimed file %s could not be read back (%s); it stays",
                          job_id, job.claimed, e)
                del self.unroutable[job_id]
                continue
            before = job.waiting_for
            if self._pass_on(job, doc):
                del self.jobs[job_id]
                self.waiting.discard(job_id)
            elif job.waiting_for != before:
                self._write_status(job)

    def _wait(self, job: Job, why: str, level: int = logging.WARNING) -> None:
        """Hold `job` back until what it waits for changes, or fail it at its deadline."""
        job.waiting_for = why
        self.waiting.add(job.job_id)
        self._write_status(job)
        self._log(job, "waiting: %s", why, level=level)

    # -- dispatch -------------------------------------------------------------------------------

    def _fill_slots(self, now: float) -> None:
        while len(self.running) + len(self.forking) < self.settings.max_concurrent \
                and not self.draining and not self.shortage.active:
            self._promote_front()
            if not self.ready:
                return
            job_id = self.ready[0][2]
            job = self.jobs.get(job_id)
            if job is not None and self._spare_due(job):
                return  # the zygote's report of a spare wakes the loop
            if job is not None and (missing := self._zygote_missing(job)) is not None:
                if not self._hold_for_zygote(job, missing):
                    return  # it is starting (it never failed): its report of ready wakes us
                continue
            entry = heapq.heappop(self.ready)
            if job is None or job.state is not JobState.QUEUED or job.waiting_for:
                continue
            try:
                self._dispatch(job, now)
            except NoRoom as e:
                self._not_started_for_space(job, entry, e)
                return
            except (OSError, UnsafeFile, ValueError, KeyError, TypeError, RecursionError) as e:
                log.exception("could not start job %s", job_id)
                self._not_started(job, e)

    def _not_started_for_space(self, job: Job, entry: tuple[int, int, str], e: NoRoom) -> None:
        """`job` could not start for lack of space: it is first in the queue again, as it was."""
        self.shortage.began(e.doing, e.error)
        if job.state is JobState.ASSIGNED:
            job.move(JobState.QUEUED)
        heapq.heappush(self.ready, entry)

    def _zygote_missing(self, job: Job) -> str | None:
        """The name of the zygote that would fork `job` while it is not there or not yet set
        up (one that dies before it is ready never forked it), else None."""
        handler = self.registry.get(job.operation)
        if handler is None:
            return None
        warm = self.registry.needs_warmth(handler)
        z = self.zygote if warm else self.forker
        return None if z is not None and z.ready else ("gkw-zygote" if warm else "gkw-forker")

    def _hold_for_zygote(self, job: Job, name: str) -> bool:
        """Move `job` aside to wait for zygote `name`, which keeps failing to start, so that
        the other zygote's jobs go on; False (it stays first) while that zygote is only
        starting, or when queue_window jobs wait so already."""
        waiters = self.zygote_waiters.setdefault(name, [])
        if not self.zygote_failures.get(name) or len(waiters) >= self.settings.queue_window:
            return False
        heapq.heappop(self.ready)
        waiters.append(job.job_id)
        self._wait(job, f"the {name} that forks it exited before it was ready, or soon "
                        f"after, or hung, {self.zygote_failures[name]} time(s) in a row; it is "
                        "started again after a pause (see the log)")
        return True

    def _zygote_ready(self, z: Zygote) -> None:
        """`z` reported itself set up: the jobs held back for it queue again."""
        z.ready, z.ready_at = True, time.monotonic()
        if z is self.forker:
            self.spares.zygote = z  # spares are asked of a forker that is set up
        for job_id in self.zygote_waiters.pop(z.name, []):
            job = self.jobs.get(job_id)
            if job is not None and job.state is JobState.QUEUED and job.waiting_for:
                job.waiting_for = None
                self.waiting.discard(job_id)
                self._enqueue(job)

    def _spare_due(self, job: Job) -> bool:
        """True when `job` would run on a spare that the zygote is forking now: wait for it."""
        handler = self.registry.get(job.operation)
        return (handler is not None and not self.registry.needs_warmth(handler)
                and self.spares.due(handler.needs_network))

    def _dispatch(self, job: Job, now: float) -> None:
        if job.deadline is not None and time.time() >= job.deadline:
            self._conclude(job, self._ending(job, "failed", ErrorCode.DEADLINE_EXCEEDED,
                                             f"job {job.job_id!r}: its deadline passed while it was queued"))
            return
        if job.idempotency_key and not self._own_key(job):
            return
        # validated at intake; only the payload is read again (waiting jobs do not hold it)
        data = loads(self.spool.read(job.where, job.claimed))["payload"]["data"]
        handler = self.registry.get(job.operation)
        assert handler is not None
        limits = self._limits(job.operation, job.asked_limits, job.timeout)
        timeout = float(job.timeout)
        if job.deadline is not None:
            timeout = min(timeout, job.deadline - time.time())
        job.move(JobState.ASSIGNED)
        with room(f"starting job {job.job_id}"):  # the attempt is recorded before the child exists
            self._write_status(job, required=True)
        workdir = self.workdirs.path(job.job_id)
        env = self._child_env(job)
        warm = self.registry.needs_warmth(handler)
        run = None if warm else self._hand_to_spare(job, data, workdir, limits, env,
                                                    handler.needs_network, timeout, now)
        if run is None:
            with room(f"starting job {job.job_id}"):
                self.workdirs.provide(workdir)
            plan = isolation.plan(self.host, self.settings, workdir=workdir, limits=limits,
                                  env=env, job_name=job.job_id, needs_network=handler.needs_network)
            spec = ChildSpec(job_id=job.job_id, operation=job.operation, attempt=job.attempt,
                             data=data, plan=plan,
                             message_cap=self.settings.max_message_bytes)
            zygote = self.zygote if warm else self.forker
            if zygote is None:
                raise OSError("no zygote to fork the job (it died and could not be restarted)")
            self.forking.append((job, request_fork(spec, timeout, now, zygote)))
            return
        self._started(job, run, now, timeout)

    def _await_forks(self) -> None:
        """Read the pids of the children asked for in this pass (their forks ran while the
        pass made its results durable and archived its jobs), and start their runs."""
        forking, self.forking = self.forking, []
        for job, f in forking:
            try:
                run = forked(f)
            except OSError as e:
                log.error("could not start job %s: %s", job.job_id, e)
                self._not_started(job, e)
            else:
                self._started(job, run, f.now, f.timeout)

    def _not_started(self, job: Job, e: Exception) -> None:
        self._conclude(job, self._ending(job, "failed", ErrorCode.INTERNAL,
                                         f"job {job.job_id!r}: could not be started: {e}"))

    def _started(self, job: Job, run: Run, now: float, timeout: float) -> None:
        """The job's child exists: watch its pipe, count it running, say so."""
        self.service.m.spawn_latency.observe(time.monotonic() - now)
        job.run = run
        run.by_deadline = timeout < job.timeout
        job.move(JobState.RUNNING)
        self.running[run.pid] = job
        self.sel.register(run.reader.fd, selectors.EVENT_READ, lambda: self._on_pipe(job))
        run.status_dirty, run.last_status = True, now  # "running" is written if it lasts
        self._log(job, "running: pid %d, attempt %d/%d, timeout %.0f s", run.pid, job.attempt,
                  job.max_attempts, timeout)

    def _hand_to_spare(self, job: Job, data: Any, workdir: Path, limits: sandbox.Limits,
                       env: dict[str, str], needs_network: bool, timeout: float,
                       now: float) -> Run | None:
        """Run the job on a waiting spare; None when none can take it (the caller forks)."""
        candidate = self.spares.pick(needs_network)
        if candidate is None:
            return None
        if candidate.cgroup is not None:
            candidate.cgroup.limit(limits.memory_mb, limits.max_processes,
                                   mark_start=not candidate.started)
        order = Order(job_id=job.job_id, operation=job.operation, attempt=job.attempt, data=data,
                      workdir=str(workdir), limits=limits, env=env,
                      nproc=isolation.nproc(limits, self.settings),
                      message_cap=self.settings.max_message_bytes)
        run = hand_to(candidate, order, timeout, now)  # None: too big for its pipe, or it died
        if run is not None:
            self.spares.taken(candidate)
        return run

    def _limits(self, operation: str, asked: dict[str, int] | None,
                timeout: int) -> sandbox.Limits:
        """The job's limits: what it asks for, never above its operation's or the worker's caps."""
        s = self.settings
        caps = {"memory_mb": s.memory_limit_mb, "cpu_seconds": s.cpu_limit_seconds or timeout,
                "max_processes": s.max_processes, "max_open_files": s.max_open_files,
                "max_file_size_mb": s.max_file_size_mb}
        caps.update(s.operation_limits.get(operation, {}))
        wanted = asked or {}
        return sandbox.Limits(**{k: min(wanted.get(k, cap), cap) for k, cap in caps.items()
                                 if k in sandbox.LIMIT_FIELDS})

    def _child_env(self, job: Job) -> dict[str, str]:
        env = {"GUESTKIT_JOB_ID": job.job_id, "GUESTKIT_OPERATION": job.operation,
               "GUESTKIT_ATTEMPT": str(job.attempt)}
        if job.idempotency_key:
            env["GUESTKIT_IDEMPOTENCY_KEY"] = job.idempotency_key
        return env

    def _own_key(self, job: Job) -> bool:
        """Take the job's idempotency key, or replay / park it; True when it may run now."""
        key = job.idempotency_key
        assert key is not None
        holder = self.remote.take_key(key, job.job_id)
        owner = self.spool.key_owner(key) if holder == job.job_id else holder
        if owner and owner != job.job_id:
            if owner in self.jobs:  # woken when it ends; failed at its own deadline before
                self.key_waiters.setdefault(key, []).append(job.job_id)
                self._wait(job, f"idempotency key {key!r} is held by job {owner!r}, not yet "
                                "finished", level=logging.INFO)
                return False
            first = self.remote.result(owner) or self.spool.read_result(owner)
            if first and first.get("status") == "completed":
                self._replay(job, owner, first)
                return False
            if first is None and self.remote.name != "spool":  # held by a job on another worker
                job.waiting_for = f"idempotency key {key!r} is held by job {owner!r} elsewhere"
                job.not_before = time.time() + 1.0
                heapq.heappush(self.retries, (job.not_before, job.job_id))
                self._write_status(job)
                return False
        with room(f"taking the idempotency key of job {job.job_id}"):
            self.spool.take_key(key, job.job_id)
        return True

    def _replay(self, job: Job, owner: str, first: dict[str, Any]) -> None:
        end = self._ending(job, "completed")
        end.data = first.get("data")
        end.output_file = (first.get("outputs") or {}).get("primary")
        end.extra = {"idempotent_replay": {"job_id": owner}}
        self._log(job, "idempotent replay of job %s", owner)
        if differs := self._unlike(job, owner):
            self._log(job, "idempotency key %r was first used by job %s for a different %s; "
                      "that job's result is replayed all the same (a key has one effect)",
                      job.idempotency_key, owner, " and ".join(differs), level=logging.WARNING)
        self._conclude(job, end)

    def _unlike(self, job: Job, owner: str) -> list[str]:
        """What of `job` (operation, payload) differs from the job `owner` that completed with
        the same key, where this spool holds that one's document."""
        ended = [a[0] for a in self.to_archive] + [h[2][0] for h in self.shortage.held]
        pending = [j for j in ended if j.job_id == owner]  # not archived yet
        try:  # only a warning depends on it: a file that cannot be read changes nothing
            first = (loads(self.spool.read(pending[0].where, pending[0].claimed)) if pending
                     else self.spool.archived(owner))
            doc = loads(self.spool.read(job.where, job.claimed))
        except (OSError, ValueError):
            return []
        if first is None:
            return []
        return [f for f in ("operation", "payload") if doc.get(f) != first.get(f)]

    # -- running jobs ---------------------------------------------------------------------------

    def _on_pipe(self, job: Job) -> None:
        run = job.run
        if run is None or self.running.get(run.pid) is not job:
            return  # ended earlier in this same loop pass (reaped, or on its result)
        for msg in run.take_messages():
            self._on_message(job, msg)
        if run.result is not None and run.cgroup is not None and run.kill_reason is None:
            self._ended_on_result(job)
        elif run.reader.eof:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(run.reader.fd)

    def _ended_on_result(self, job: Job) -> None:
        """Its result is its last message: finish now, not after its exit is reaped.

        Tearing down a forked address space takes milliseconds; the job's cgroup already
        holds its CPU time and peak memory, and /proc its storage I/O. The process is
        killed with its tree as at any end and reaped later without further effect.
        """
        run = job.run
        assert run is not None
        run.io_bytes = storage_io(run.pid)
        self.running.pop(run.pid, None)
        self.lingering[run.pid] = (run.origin, None)
        run.status = 0  # what is left of it is os._exit(0)
        self._finish_run(job)

    def _on_message(self, job: Job, msg: dict[str, Any]) -> None:
        run = job.run
        assert run is not None
        run.last_message = time.monotonic()
        kind = msg.get("type")
        self.service.progressed()
        if kind == "progress":
            run.progress = {k: msg.get(k) for k in ("phase", "percent", "message")}
            pct = f" ({msg['percent']}%)" if msg.get("percent") is not None else ""
            self._log(job, "%s - %s%s", msg.get("phase"), msg.get("message"), pct)
            run.status_dirty = True
            if run.last_message - run.last_status >= STATUS_EVERY:
                self._write_status(job)
        elif kind == "log":
            level = logging.getLevelName(str(msg.get("level", "info")).upper())
            self._log(job, "%s", msg.get("message"), level=level if isinstance(level, int) else 20)
        elif kind == "result":
            run.result = msg
        elif kind == "error":
            run.error = msg
        elif kind == "sandbox":
            run.layers = [str(x) for x in msg.get("layers") or []]
        else:
            self._log(job, "ignored a malformed message from the job: %r", msg,
                      level=logging.WARNING)

    def _reap(self) -> None:
        for pid, status, rusage in sandbox.reaped():
            z = next((z for z in (self.forker, self.zygote) if z is not None and z.pid == pid),
                     None)
            if z is not None:
                self._zygote_died(z, status)
            else:  # an orphan that came back to us as the subreaper
                self._ended(pid, status, rusage)

    def _ended(self, pid: int, status: int, rusage: Any) -> None:
        """A child is gone (reaped here or reported by the zygote): finish its job."""
        if (gone := self.lingering.pop(pid, None)) is not None:  # its job ended on its result
            log.debug("process %d exited after its job had ended on its result", pid)
            if gone[1] is not None:
                self.workdirs.recycle(Path(gone[1]))
            return
        job = self.running.pop(pid, None)
        if job is None:
            self.service.m.descendants_reaped.inc()
            return
        assert job.run is not None
        job.run.status, job.run.rusage = status, rusage
        self._finish_run(job)

    def _finish_run(self, job: Job) -> None:
        """The run is over: kill what is left of it (nothing of a job may act once its result
        is out), write its result (or queue its retry; made durable later in the pass), then
        give its cgroup back."""
        run = job.run
        assert run is not None
        for msg in run.take_messages():
            self._on_message(job, msg)
        if run.cgroup is not None:
            run.cgroup_stats = run.cgroup.stats()
        run.kill_tree()
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(run.reader.fd)
        run.reader.close()
        try:
            self._end_run(job, run)
        finally:
            if run.cgroup is not None and self.host.pool is not None:
                self.host.pool.release(run.cgroup)

    def _end_run(self, job: Job, run: Run) -> None:
        outcome = decide(run)
        reason = run.kill_reason or (outcome.code.value.lower() if outcome.code in (
            ErrorCode.CPU_LIMIT, ErrorCode.MEMORY_LIMIT, ErrorCode.KILLED) else None)
        if reason:
            self.service.m.kills.labels(reason=reason).inc()
        if outcome.status == "requeue" or (
            outcome.status == "failed" and outcome.retryable and outcome.code in RETRYABLE
            and job.attempt < job.max_attempts
        ):
            self._retry(job, outcome)
            return
        end = self._ending(job, outcome.status, outcome.code, outcome.message)
        end.retryable, end.details = outcome.retryable, outcome.details
        if run.result is not None and outcome.status == "completed":
            end.data = run.result.get("data")
            end.output_file = run.result.get("output_file")
            end.artifacts = list(run.result.get("artifacts") or [])
        self._conclude(job, end)

    def _retry(self, job: Job, outcome: Outcome) -> None:
        """Queue the next attempt after a back-off, or end the job when attempts are spent."""
        if job.attempt >= job.max_attempts:
            code = outcome.code or ErrorCode.WORKER_LOST
            self._conclude(job, self._ending(job, "failed", code,
                                             f"{outcome.message}; no attempts left "
                                             f"({job.attempt} of {job.max_attempts})"))
            return
        delay = min(self.settings.retry_backoff * 2 ** (job.attempt - 1),
                    self.settings.retry_backoff_max)
        self._log(job, "attempt %d/%d ended (%s: %s); retrying in %.1f s%s", job.attempt,
                  job.max_attempts, outcome.code, outcome.message, delay,
                  " once the worker runs again (it is draining)" if self.draining else "",
                  level=logging.WARNING)
        job.run = None
        job.move(JobState.QUEUED)
        job.attempt += 1
        self.service.m.retries.inc()
        job.not_before = time.time() + delay
        if delay > 0 and job.where == ACTIVE:
            try:
                self.spool.move(job.claimed, ACTIVE, RETRY)
                job.where = RETRY
            except OSError as e:  # it waits in .active instead (a restart sees the same)
                if not self.shortage.noted(f"moving job {job.job_id} to wait for its retry", e):
                    raise
        self._write_status(job)
        heapq.heappush(self.retries, (job.not_before, job.job_id))

    def _housekeep(self) -> None:
        """Time-based work outside running jobs: retries due, waiting jobs too late, inbox
        files a writer held open, old cgroups."""
        now = time.time()
        self._release_retries(now)
        self._expire_waiting(now)
        if self.shortage.due(time.monotonic()):
            self._retry_space()
        if self.intake.still_open and now >= self._next_look and not self.draining \
                and not self.shortage.active:
            self._next_look = now + HOUSEKEEPING
            for name in list(self.intake.still_open):
                if self.shortage.active:
                    break
                self._take(name, "looked")
        if self.host.pool is not None and self.host.pool.draining:
            self.host.pool.retry()
        if self.zygotes_due and min(self.zygotes_due.values()) <= time.monotonic() \
                and not self.draining:
            self._start_zygotes()

    def _retry_space(self) -> None:
        """Space was short: write the held results, oldest first, and once all are written and
        a probe finds room, take and start jobs again (the inbox is scanned for what came)."""
        s = self.shortage
        while s.held:
            job_id, doc, archive = s.held[0]
            if not self._store_result(job_id, doc, archive):  # archived once durable
                return
            s.release()
        if not self._sync_results() or not self._archive():
            return
        try:
            self.spool.probe_space()
        except OSError:  # of any kind: taken for no room yet
            return
        s.ended()
        if not self.draining:
            self._scan()

    def _release_retries(self, now: float) -> None:
        while self.retries and self.retries[0][0] <= now:
            _, job_id = heapq.heappop(self.retries)
            job = self.jobs.get(job_id)
            if job is None or job.state is not JobState.QUEUED:
                continue
            if job.where == RETRY:
                try:
                    self.spool.move(job.claimed, RETRY, ACTIVE)
                except OSError as e:
                    if not self.shortage.noted(f"moving job {job_id} back to run", e):
                        raise
                    heapq.heappush(self.retries, (now + 1.0, job_id))
                    return
                job.where = ACTIVE
            job.waiting_for = None  # a key held elsewhere is looked at again at dispatch
            self._enqueue(job)

    def _expire_waiting(self, now: float) -> None:
        for job_id in [j for j in self.waiting if (self.jobs[j].deadline or now + 1) <= now]:
            self.waiting.discard(job_id)
            job = self.jobs[job_id]
            self._conclude(job, self._ending(job, "failed", ErrorCode.DEADLINE_EXCEEDED,
                                             f"job {job_id!r}: its deadline passed while it waited "
                                             f"({job.waiting_for})"))

    def _enforce(self, now: float) -> None:
        """Apply every time-based rule to running jobs: timeouts, kill steps, drain, status, stall."""
        shutdown = self.drain_deadline is not None and now >= self.drain_deadline
        for job in list(self.running.values()):
            self._escalate(job, now, shutdown)
            self._observe(job, now)

    def _escalate(self, job: Job, now: float, shutdown: bool) -> None:
        run = job.run
        assert run is not None
        if run.kill_at is not None and now >= run.kill_at and not run.killed:
            run.kill_tree()  # STOPPING -> KILL
            run.killed = True
        elif run.kill_reason is None and now >= run.deadline:
            self._log(job, "%s after %.0f s; stopping it", "its deadline passed" if
                      run.by_deadline else "timed out", now - run.started, level=logging.WARNING)
            run.begin_kill("deadline" if run.by_deadline else "timeout",
                           self.settings.kill_grace, now)
        elif shutdown and run.kill_reason is None:
            self._log(job, "still running at the end of the drain; stopping it",
                      level=logging.WARNING)
            run.begin_kill("shutdown", self.settings.kill_grace, now)

    def _observe(self, job: Job, now: float) -> None:
        run = job.run
        assert run is not None
        if run.status_dirty and now - run.last_status >= STATUS_EVERY:
            self._write_status(job)
        if not run.stalled and now - run.last_message > self.settings.stall_timeout:
            run.stalled = True
            self._write_status(job)
            self._log(job, "stalled: no report for %.0f s", now - run.last_message,
                      level=logging.WARNING)

    # -- ends -----------------------------------------------------------------------------------

    def _ending(self, job: Job, status: str, code: ErrorCode | None = None,
                message: str = "") -> Ending:
        run = job.run
        now = time.time()
        return Ending(
            job_id=job.job_id, status=status, attempt=job.attempt,
            max_attempts=job.max_attempts, idempotency_key=job.idempotency_key, code=code,
            message=message, phase=(run.progress.get("phase") or "execution") if run else "queued",
            started_at=run.started_wall if run else None, finished_at=now,
            metrics=run_metrics(run, time.monotonic()) if run else None,
            progress=run.progress or None if run else None, observability=job.observability,
            extra={"isolation": run.layers, "limits": run.limits} if run else {},
        )

    def _conclude(self, job: Job, end: Ending) -> None:
        """Publish the one result, archive the job file, forget the job, wake its waiters."""
        job.move(JobState(end.status))
        doc = build(end, self.settings)
        archive = (job, end.status == "completed", f"{end.code}: {end.message}" if end.code else "")
        detail = ""
        if self.shortage.held or not self._store_result(job.job_id, doc, archive):
            self.shortage.hold(job.job_id, doc, archive)  # in order, behind the others
            detail = " (its result waits for space)"
        if end.status == "completed":  # any other end keeps its dir for whoever looks into it
            self._recycle_workdir(job)
        self.jobs.pop(job.job_id, None)
        self.waiting.discard(job.job_id)
        if not self.jobs and not self.backlog and self.held >= COMPACT_AFTER:
            self._compact()
        m = self.service.m
        # an operation no handler serves is named by whoever wrote the job: one series for all
        known = self.registry.get(job.operation) is not None
        m.jobs.labels(operation=job.operation if known else "unknown",
                      outcome=end.code or end.status).inc()
        if job.run is not None:
            m.job_duration.labels(operation=job.operation).observe(
                time.monotonic() - job.run.started)
        self.service.progressed()
        level = logging.INFO if end.status == "completed" else logging.WARNING
        detail = (f" ({end.code}: {end.message})" if end.code else "") + detail
        self._log(job, "%s%s", end.status, detail, level=level)
        if job.idempotency_key:
            for waiter in self.key_waiters.pop(job.idempotency_key, []):
                other = self.jobs.get(waiter)
                if other is not None and other.state is JobState.QUEUED:
                    other.waiting_for = None
                    self.waiting.discard(waiter)
                    self._enqueue(other)

    def _store_result(self, job_id: str, doc: dict[str, Any], archive: tuple[Job, bool, str]) -> bool:
        """Write the result of `job_id` here, then share it (a shared queue may hold another
        worker's first: this one is then taken back); its job is archived once it is durable.
        False, nothing shared, when there is no space for it."""
        job = archive[0]
        try:
            staged = self.spool.publish_result(job_id, doc)
        except OSError as e:
            if not self.shortage.noted(f"writing the result of job {job_id}", e):
                raise
            return False
        if not self.remote.publish(job_id, doc):
            if staged:
                self.spool.unstage(job_id)
            self._log(job, "its message is another worker's now: this copy leaves no result"
                      if self.remote.disowned(job_id) else
                      "another worker's result came first; kept it", level=logging.WARNING)
        elif not staged:
            self._log(job, "a result already existed; kept the first", level=logging.WARNING)
        self.to_archive.append(archive)
        return True

    def _recycle_workdir(self, job: Job) -> None:
        """The job has completed: keep its work dir blank for the next job if it left it so,
        once nothing of the job is left (its PID 1 reaped: the namespace is empty)."""
        run = job.run
        if run is None or run.workdir is None:
            return
        if run.pid in self.lingering:
            self.lingering[run.pid] = (run.origin, run.workdir)
        elif run.rusage is not None:  # reaped here or reported by its zygote (not just lost)
            self.workdirs.recycle(Path(run.workdir))

    def _compact(self) -> None:
        """The queue emptied after holding many jobs: give back what their tables still hold."""
        log.debug("queue empty after holding %d jobs; returning memory", self.held)
        self.held = 0
        self.jobs.clear()  # an emptied dict keeps its table; clear() frees it
        self.ready = []
        self.waiting = set()
        memory.trim()

    def _archive_ended(self) -> None:
        """Once per pass, after its fork requests: make this pass's results durable, then
        archive and ack their jobs, then, when no job waits, give up the CPU once (the
        client a result woke runs first). A result's fsyncs never hold up the next job's fork."""
        if not self._sync_results() or not self.to_archive or not self._archive():
            return
        if not self.ready and not self.backlog:
            os.sched_yield()  # who waits for these results runs before the pass prepares for more

    def _archive(self) -> bool:
        """Archive and ack the jobs whose results are durable, in order; False when there is
        no room for one (it and those after it wait)."""
        done = 0
        for job, ok, reason in self.to_archive:
            try:
                self.spool.archive(job.where, job.claimed, job.job_id, ok, reason)
            except OSError as e:
                if not self.shortage.noted(f"archiving job {job.job_id}", e):
                    raise
                break
            if job.message_id:
                self.remote.acknowledge(job.message_id, job.job_id, ok)
            done += 1
        del self.to_archive[:done]
        return not self.to_archive

    def _reject_message(self, message_id: str) -> None:
        """Tell the shared queue its message was refused; it shares the result from its file."""
        self._sync_results()
        self.remote.reject(message_id, self.intake.last_rejection or {})

    def _sync_results(self) -> bool:
        """Put every result written so far durably under its name; False when there is no
        space for that (they stay written, for the next try)."""
        try:
            taken = self.spool.sync_results()
        except OSError as e:
            if not self.shortage.noted("linking results under their names", e):
                raise
            return False
        for job_id in taken:
            log.warning("job %r: a result already existed; kept the first", job_id,
                        extra={"job_id": job_id, "worker_id": self.settings.worker_id})
        return True

    def _cancel_queued(self, job: Job) -> None:
        self._conclude(job, self._ending(job, "cancelled", ErrorCode.CANCELLED,
                                         f"job {job.job_id!r} was cancelled before it ran"))

    def _on_cancel(self, job_id: str) -> None:
        job = self.jobs.get(job_id)
        if job is None and (entry := self.backlog.take(job_id)) is not None:
            self._promote(entry)  # admitting it again sees the request
            return
        if job is None:
            if self.spool.has_result(job_id):
                self.spool.clear_cancel(job_id)
            return  # it may not have arrived yet: the request waits for it
        if job.state is JobState.QUEUED and self.remote.disowned(job_id):
            self._conclude(job, self._ending(job, "cancelled", ErrorCode.CANCELLED,
                                             f"job {job_id!r}: its message went to another "
                                             "worker, or back to the queue; this copy is dropped"))
        elif not job.cancellable:
            self._refuse_cancel(job)
        elif job.state is JobState.QUEUED:
            self._cancel_queued(job)
        elif job.run is not None:
            self._log(job, "cancel requested; stopping it")
            job.run.begin_kill("cancel", self.settings.kill_grace, time.monotonic())

    def _refuse_cancel(self, job: Job) -> None:
        self._log(job, "cancel refused: execution.cancellable is false", level=logging.WARNING)
        self.spool.clear_cancel(job.job_id)

    # -- recovery -------------------------------------------------------------------------------

    def _recover(self) -> None:
        """Bring back every claimed job after a restart (DESIGN §3); a file that cannot be
        is logged and left for the next start, never a reason not to start."""
        for where, claimed in self.spool.claimed():
            try:
                self._recover_file(where, claimed)
            except Exception:
                log.exception("could not recover the claimed job file %s/%s; it stays there",
                              where, printable(claimed))

    def _recover_file(self, where: str, claimed: str) -> None:
        data, label = self.spool.read(where, claimed), printable(claimed)
        try:
            doc, _ = parse_job(data, label)
        except Exception:
            self.intake.admit(where, claimed, data, label)
            return  # rejected
        if self.spool.has_result(doc.job_id):
            first = self.spool.read_result(doc.job_id) or {}
            self.spool.archive(where, claimed, doc.job_id, first.get("status") == "completed")
            return
        self._recover_one(where, claimed, data, doc.job_id,
                          message_id=self.spool.message_of(claimed))  # a queue's: held again

    def _recover_one(self, where: str, claimed: str, data: bytes, job_id: str | None,
                     running_attempt: int | None = None, message_id: str | None = None) -> None:
        """Admit a job a stopped worker had claimed: the attempt it was running counts."""
        status = (self.spool.read_status(job_id) if job_id else None) or {}
        if status.get("job_id") != job_id:  # not fsync'd: a power cut may leave another's
            status = {}
        attempt = running_attempt or int(status.get("attempt") or 0) or None
        was_running = running_attempt is not None or status.get("state") in ("assigned", "running")
        acc = self.intake.admit(where, claimed, data, claimed,
                                attempt=(attempt + 1) if was_running and attempt else attempt)
        if acc is None:
            if message_id:
                self._reject_message(message_id)
            return
        job = acc.job
        job.message_id = message_id
        if was_running and attempt and attempt >= job.max_attempts:
            job.attempt = attempt
            self.jobs[job.job_id] = job
            what = (f"the worker running attempt {attempt} of {job.max_attempts} stopped, or "
                    "stopped renewing its lease (what that copy does from then on does not "
                    "count)" if running_attempt is not None else
                    f"the worker stopped while attempt {attempt} of {job.max_attempts} ran")
            self._conclude(job, self._ending(job, "failed", ErrorCode.WORKER_LOST,
                                             f"job {job.job_id!r}: {what}; no attempts left"))
            return
        if was_running:
            self._log(job, "recovered after a worker stopped; attempt %d/%d next", job.attempt,
                      job.max_attempts, level=logging.WARNING)
            self._write_status(job)
        job.not_before = float(status.get("not_before") or 0.0)
        self._admit(acc)

    # -- signals' work ------------------------------------------------------------------------

    def _begin_drain(self, why: str) -> None:
        now = time.monotonic()
        if self.draining:
            log.warning("%s again: stopping running jobs now", why)
            self.drain_deadline = now
            return
        self.draining = True
        self.drain_deadline = now + self.settings.shutdown_timeout
        self.remote.stop_intake()
        self.spares.keep(self.settings, 0, draining=True)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(self.watch)
        log.info("%s: draining; %d running job(s) get %.0f s to finish", why, len(self.running),
                 self.settings.shutdown_timeout)
        self.service.stopping(self._status_text())

    def _reload(self) -> None:
        if self.reload_settings is None:
            return
        self.service.reloading()
        try:
            new = self.reload_settings()
        except Exception as e:
            log.error("reload failed, keeping the current settings: %s", e)
            self.service.ready(self._status_text())
            return
        fixed = [k for k in RESTART_ONLY if getattr(new, k) != getattr(self.settings, k)]
        if fixed:
            log.warning("reload: %s cannot change while running; restart to apply",
                        ", ".join(fixed))
            new = new.model_copy(update={k: getattr(self.settings, k) for k in fixed})
        self.settings = new
        self.intake.settings = new
        self.spool.fsync = new.fsync
        setup_logging(new.log_format, new.log_level)  # also reopens the log
        log.info("reloaded settings: %d slot(s)", new.max_concurrent)
        self.service.ready(self._status_text())

    def _dump(self) -> None:
        log.info("status: %d running, %d queued (%d of them in the backlog), %d waiting, "
                 "%d retrying, draining=%s%s", len(self.running),
                 len(self.ready) + len(self.backlog), len(self.backlog), len(self.waiting),
                 len(self.retries), self.draining, self._shortage_text())
        for job in self.running.values():
            assert job.run is not None
            self._log(job, "running pid %d for %.1f s, progress %s", job.run.pid,
                      time.monotonic() - job.run.started, job.run.progress)

    def _shortage_text(self) -> str:
        s = self.shortage
        if s.since is None:
            return ""
        return (f"; no space on the spool's disk for {time.monotonic() - s.since:.0f} s, "
                f"{len(s.held)} result(s) held")

    # -- helpers --------------------------------------------------------------------------------

    def _write_status(self, job: Job, required: bool = False) -> None:
        """Record the job's live status; without space only a `required` one raises (the
        others are advisory: the one before stays)."""
        if job.run is not None:
            job.run.last_status = time.monotonic()
            job.run.status_dirty = False
        doc = job.status_doc(self.settings.worker_id)
        try:
            self.spool.write_status(job.job_id, doc)
        except OSError as e:
            if required or not self.shortage.noted(f"writing the status of job {job.job_id}", e):
                raise
        if job.message_id:
            self.remote.status(job.job_id, doc)

    def _log(self, job: Job, fmt: str, *args: Any, level: int = logging.INFO) -> None:
        if not log.isEnabledFor(level):
            return
        log.log(level, fmt, *args, extra={"job_id": job.job_id, "operation": job.operation,
                                          "state": job.state.value, "attempt": job.attempt,
                                          "worker_id": self.settings.worker_id})

"""Taking a file from the inbox: open safely, claim by rename, read, validate, or move aside."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from pydantic import ValidationError

from worker import fsutil, routing
from worker.config import Settings
from worker.errors import ErrorCode, HandlerError, JobRejected, UnsafeFile
from worker.job import Job
from worker.registry import Registry
from worker.results import Ending, build
from worker.shortage import out_of_space
from worker.spec import JobDocument, describe, parse_job
from worker.spool import ACTIVE, Spool

#: Where no lease tells whether a writer still has an inbox file open and no close event
#: can come, it is taken once it has not changed for this long.
STILL_FOR_NS = 1_000_000_000
#: What brought an inbox name to `Intake.take`: its creation (it may still be written), its
#: writer's close or a move into the inbox, a scan of the inbox, or a look again at a file
#: left as still open.
Seen = Literal["created", "closed", "scanned", "looked"]
#: A file no lease could vouch for, as last seen: size, mtime (ns), and whether it waits
#: for its writer's close event (it was created in the inbox, not linked in).
Mark = tuple[int, int, bool]

log = logging.getLogger("guestkit.intake")


@dataclass
class Accepted:
    """A claimed, valid job, and its end when it must not run at all (e.g. unsupported)."""

    job: Job
    doc: JobDocument
    ending: Ending | None = None


class Verdict(NamedTuple):
    """What `Intake.judge` makes of a valid document."""

    problem: tuple[ErrorCode, str] | None  # why it cannot run at all (its end), or None
    wait: str | None  # why it waits (for another worker, or for what this one lacks), or None
    judged_here: bool = True  # its operation and payload were checked against this worker


class Intake:
    """Turns inbox names into queued jobs, rejecting what cannot be accepted."""

    def __init__(
        self, spool: Spool, registry: Registry, settings: Settings, version: str,
        known: Callable[[str], bool], rejected: Callable[[], None] = lambda: None,
    ) -> None:
        self.spool = spool
        self.registry = registry
        self.settings = settings
        self.known = known
        self.rejected = rejected  #: called once per file or queue job moved aside
        #: what routing and constraints are judged against, here and by the other workers
        self.profile = routing.Profile.of(settings, registry.capabilities(), registry.features(),
                                          version)
        self.last_rejection: dict[str, Any] | None = None
        #: inbox names left because a writer had them open (or may have: then with a Mark):
        #: looked at again now and then, as the writer's close is seen only when it opened
        #: the file in the inbox
        self.still_open: dict[str, Mark | None] = {}

    def take(self, name: str, seen: Seen = "closed") -> Accepted | None:
        """Claim and validate inbox file `name`; None when gone, still open, or rejected.
        `seen`: what brought it here (see Seen)."""
        before = self.still_open.pop(name, None)
        src = self.spool.inbox_file(name)
        label = fsutil.printable(name)
        try:
            fd, st = fsutil.open_regular(src)
        except FileNotFoundError:
            return None
        except UnsafeFile as e:
            self._reject(src, None, ErrorCode.VALIDATION_ERROR, f"job file {label}: {e}",
                         name=name)
            return None
        try:
            if self._still_written(name, fd, st, seen, before):
                return None
            claimed = self.spool.claim(name)
            if claimed is None:
                return None
            try:
                return self._read_claimed(fd, st, claimed, label)
            except OSError as e:
                if out_of_space(e):  # taken again once there is space
                    self.spool.unclaim(claimed, name)
                raise
        finally:
            os.close(fd)

    def _read_claimed(self, fd: int, st: os.stat_result, claimed: str, label: str
                      ) -> Accepted | None:
        """Read and admit a file just claimed; an oversized one is moved aside."""
        try:
            data = fsutil.read_capped(fd, st.st_size, self.settings.max_job_bytes)
        except UnsafeFile as e:
            self._reject(self.spool.path(ACTIVE, claimed), None, ErrorCode.VALIDATION_ERROR,
                         f"job file {label}: {e}")
            return None
        return self.admit(ACTIVE, claimed, data, label=label)

    def _still_written(self, name: str, fd: int, st: os.stat_result, seen: Seen,
                       before: Mark | None) -> bool:
        """True (and `name` noted as still open) while a writer may still be writing it.
        Where no lease can tell: a file seen created in the inbox waits for its close event;
        one linked in, found by a scan, or looked at again is taken once it has stood still
        for STILL_FOR_NS (`before`: how it was at the last look)."""
        writer = fsutil.has_writer(fd)
        mark = None
        if writer is None and seen != "closed":
            awaits_close = (seen == "created" and st.st_nlink == 1) or (
                seen == "looked" and before is not None and before[2])
            mark = (st.st_size, st.st_mtime_ns, awaits_close)
            writer = awaits_close or seen == "created" or before is None or (
                mark[:2] != before[:2] or abs(time.time_ns() - st.st_mtime_ns) < STILL_FOR_NS)
        if writer:
            self.still_open[name] = mark
        return bool(writer)

    def admit(self, where: str, claimed: str, data: bytes, label: str,
              attempt: int | None = None) -> Accepted | None:
        """Validate claimed bytes into a Job; reject (and say why) what is not a valid job."""
        path = self.spool.path(where, claimed)
        try:
            doc, _ = parse_job(data, label)
        except JobRejected as e:
            self._reject(path, e.job_id, e.code, e.message, observability=e.observability)
            return None
        if self.known(doc.job_id) or self.spool.has_result(doc.job_id):
            self._reject(path, None, ErrorCode.VALIDATION_ERROR,
                         f"job {doc.job_id!r}: field 'job_id': duplicate; a job with this id "
                         "is already queued, running or finished", duplicate_of=doc.job_id)
            return None
        ex = doc.execution
        job = Job(
            job_id=doc.job_id, claimed=claimed, where=where, operation=doc.operation,
            priority=ex.priority, attempt=attempt or ex.attempt, max_attempts=ex.max_attempts,
            timeout=ex.timeout_seconds,
            deadline=ex.deadline.timestamp() if ex.deadline else None,
            cancellable=ex.cancellable, idempotency_key=ex.idempotency_key,
            asked_limits=ex.limits.model_dump(exclude_none=True) if ex.limits else None,
        )
        verdict = self.judge(doc)
        job.waiting_for = verdict.wait
        ending = self._ending(job, doc, *verdict.problem) if verdict.problem else None
        return Accepted(job, doc, ending)

    def judge(self, doc: JobDocument) -> Verdict:
        """Whether a valid document can run here, and why it waits. A job meant for other
        workers is not judged by this one's handlers, image roots and output dir; one meant
        for any worker here is checked for its operation and payload, then for what it
        requires of the worker."""
        if wait := routing.elsewhere(doc, self.profile):
            return Verdict(None, wait, judged_here=False)
        if problem := self._problem(doc):
            return Verdict(problem, None)
        return Verdict(None, routing.lacking(doc, self.profile))

    def _problem(self, doc: JobDocument) -> tuple[ErrorCode, str] | None:
        """Why a valid document cannot run here at all, or None."""
        handler = self.registry.get(doc.operation)
        who = f"job {doc.job_id!r}"
        if handler is None:
            return (ErrorCode.UNSUPPORTED_OPERATION,
                    f"{who}: field 'operation': {self.registry.why_missing(doc.operation)}")
        if handler.payload_types and doc.payload.type not in handler.payload_types:
            return (ErrorCode.VALIDATION_ERROR,
                    f"{who}: field 'payload.type': expected one of "
                    f"{list(handler.payload_types)}, got {doc.payload.type!r}")
        try:
            handler.validate(doc.payload.data)
        except ValidationError as e:
            return ErrorCode.VALIDATION_ERROR, f"{who}: {describe(e, 'payload.data')}"
        except HandlerError as e:
            return ErrorCode.VALIDATION_ERROR, f"{who}: {e}"
        if doc.execution.deadline is not None and doc.execution.deadline.timestamp() <= time.time():
            return (ErrorCode.DEADLINE_EXCEEDED,
                    f"{who}: field 'execution.deadline': {doc.execution.deadline.isoformat()} "
                    "has already passed")
        return None

    def _ending(self, job: Job, doc: JobDocument, code: ErrorCode, message: str) -> Ending:
        return Ending(
            job_id=job.job_id, status="failed", attempt=job.attempt,
            max_attempts=job.max_attempts, idempotency_key=job.idempotency_key, code=code,
            message=message, phase="validation",
            observability=doc.observability.model_dump() if doc.observability else None,
        )

    def _reject(self, src: str | Path, job_id: str | None, code: ErrorCode, message: str,
                duplicate_of: str | None = None, name: str | None = None,
                observability: dict[str, Any] | None = None) -> None:
        """Move a file aside with its reason (`name`: its inbox name, when it was not claimed);
        write a failed result when a safe, new id is known."""
        record: dict[str, Any] = {"job_id": job_id or duplicate_of, "code": code.value,
                                  "message": message}
        if duplicate_of:
            record["duplicate_of"] = duplicate_of
        self.last_rejection = record
        staged = False
        if job_id and not self.known(job_id):  # staged first: a full disk moves nothing
            end = Ending(job_id=job_id, status="failed", code=code, message=message,
                         phase="validation", observability=observability)
            staged = self.spool.publish_result(job_id, build(end, self.settings))
        try:
            dest = self.spool.reject(src, record, name)
        except BaseException as e:
            if staged and job_id:
                self.spool.unstage(job_id)
            if isinstance(e, FileNotFoundError):
                return
            raise
        self.rejected()
        log.warning("rejected %s: %s", fsutil.printable(dest.name), message,
                    extra={"job_id": job_id or duplicate_of, "state": "failed"})

"""The directory protocol (DESIGN §3): which file exists where is the state of record."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import logging
import os
import re
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from worker import fsutil
from worker.config import Settings
from worker.errors import ConfigError, SpoolLocked
from worker.shortage import out_of_space
from worker.spec import JOB_ID_RE, JOB_ID_TEXT, dumps, dumps_pretty, loads, rfc3339, safe_job_id

#: What a probe for free space writes (more than a job's status or result usually needs).
PROBE_BYTES = 64 << 10
#: Up to this many inbox files, a scan takes them oldest-named first.
SORTED_SCAN = 10_000

ACTIVE, RETRY = ".active", ".retry"

log = logging.getLogger("guestkit.spool")
#: the claimed name `materialize` gives a message: a claim always puts "-" after the sequence
#: number, so no inbox file name can pass for one
_QUEUE_FILE = re.compile(r"^\d+-\d+\.queue-(\d+-\d+)\.json$")


class Spool:
    """One jobs directory and its results directory; only the supervisor writes outside the inbox."""

    def __init__(self, settings: Settings) -> None:
        self.inbox = settings.jobs_dir.absolute()
        self._inbox = os.fspath(self.inbox)
        self.results = settings.results_dir.absolute()
        self.work = settings.work_dir.absolute()
        self.fsync = settings.fsync
        d = self.inbox
        self.tmp, self.status_dir, self.cancel_dir, self.keys = (
            d / ".tmp", d / ".status", d / ".cancel", d / ".keys"
        )
        self.done, self.failed, self.rejected = d / "done", d / "failed", d / "rejected"
        self.status_files = fsutil.FilePool(self.status_dir)
        self._lock_fd: int | None = None
        self._next_result: Path | None = None  # an empty file for the next result
        #: results written in this loop pass, not yet under their names: id -> hidden file
        self._staged: dict[str, Path] = {}
        self._unsynced_dir = False  # a result was linked since the results dir's last fsync
        self._seq = itertools.count()
        # per-job paths as strings (see `path`)
        self._results, self._status, self._cancel, self._done, self._failed = (
            os.fspath(p) for p in (self.results, self.status_dir, self.cancel_dir, self.done,
                                   self.failed))

    def setup(self) -> None:
        """Create every directory of the spool; ConfigError naming the one that cannot be."""
        try:
            fsutil.makedirs(
                self.inbox, self.inbox / ACTIVE, self.inbox / RETRY, self.tmp, self.status_dir,
                self.cancel_dir, self.keys, self.done, self.failed, self.rejected, self.results,
                self.work,
            )
        except OSError as e:
            raise ConfigError(f"the spool's directories (jobs_dir {self.inbox}, results_dir "
                              f"{self.results}, work_dir {self.work}) cannot be made: "
                              f"{e.filename}: {e.strerror}") from None
        self.status_files.open()

    def lock(self) -> None:
        """Take the spool's lock for this process; raise SpoolLocked when another supervisor has it."""
        fd = os.open(self.inbox / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SpoolLocked(
                f"another supervisor (pid {holder}) already serves the spool {self.inbox}"
            ) from None
        os.ftruncate(fd, 0)
        try:  # what names the holder to another supervisor; a full disk leaves it out
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            if not out_of_space(e):
                raise
        self._lock_fd = fd

    def server(self) -> int | None:
        """The pid of the supervisor holding this spool's lock now, or None (read from
        /proc/locks: trying the lock, even shared, could turn a starting supervisor away)."""
        try:
            st = os.stat(self.inbox / ".lock")
            with open("/proc/locks") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        for line in lines:
            fields = line.split()
            if "FLOCK" in fields and dev in fields:
                return int(fields[fields.index(dev) - 1])
        return None

    # -- inbox --------------------------------------------------------------------------

    def inbox_names(self) -> list[str]:
        """Names in the inbox that look like job files, oldest-named first."""
        with os.scandir(self.inbox) as it:
            return sorted(e.name for e in it if job_name(e.name))

    def each_inbox_name(self, sort_up_to: int = SORTED_SCAN) -> Iterator[str]:
        """The inbox's job file names for a scan: oldest-named first when there are at most
        `sort_up_to`, else in directory order, so a deep inbox is never held in memory."""
        with os.scandir(self.inbox) as it:
            names = (e.name for e in it if job_name(e.name))
            first = list(itertools.islice(names, sort_up_to + 1))
            if len(first) <= sort_up_to:
                yield from sorted(first)
                return
            yield from first
            yield from names

    def claim(self, name: str) -> str | None:
        """Move an inbox file into .active under a unique name; None when it is gone."""
        claimed = f"{time.time_ns():020d}-{next(self._seq):06d}-{_short(name)}"  # UTF-8
        try:
            os.rename(self.inbox_file(name), self.path(ACTIVE, claimed))
        except FileNotFoundError:
            return None
        return claimed

    def unclaim(self, claimed: str, name: str) -> None:
        """Put a claimed file back into the inbox as `name` (to be taken again later); a file
        of that name that arrived meanwhile keeps it, and this one stays claimed."""
        try:
            fsutil.rename_noreplace(self.path(ACTIVE, claimed), self.inbox_file(name))
        except FileNotFoundError:
            pass
        except FileExistsError:
            log.warning("claimed file %s could not go back into the inbox (a new %s is there); "
                        "it stays claimed until the next start recovers it", claimed,
                        fsutil.printable(name))

    def materialize(self, message_id: str, data: bytes) -> str:
        """Store a job delivered by a shared queue as a claimed file; return its claimed name."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in message_id)
        claimed = f"{time.time_ns():020d}-{next(self._seq):06d}.queue-{safe}.json"
        fsutil.write_atomic(Path(self.path(ACTIVE, claimed)), data, fsync=self.fsync)
        return claimed

    @staticmethod
    def message_of(claimed: str) -> str | None:
        """The shared queue's message id in a claimed name `materialize` made, else None."""
        m = _QUEUE_FILE.match(claimed)
        return m.group(1) if m else None

    def path(self, where: str, claimed: str) -> str:
        """Where a claimed job file lives (`where` is .active or .retry).

        Per-job paths are plain strings: pathlib interns every name it parses, and the
        interpreter's table of interned strings never shrinks.
        """
        return f"{self._inbox}/{where}/{claimed}"

    def inbox_file(self, name: str) -> str:
        """The path of inbox file `name`."""
        return f"{self._inbox}/{name}"

    def read(self, where: str, claimed: str) -> bytes:
        """The bytes of a claimed job file (the supervisor's own: no checks needed)."""
        return fsutil.read_whole(self.path(where, claimed))

    def move(self, claimed: str, src: str, dst: str) -> None:
        """Move a claimed job file between .active and .retry."""
        os.rename(self.path(src, claimed), self.path(dst, claimed))

    def claimed(self) -> list[tuple[str, str]]:
        """Every claimed job file as (where, name), for recovery."""
        return [(w, n) for w in (ACTIVE, RETRY) for n in sorted(os.listdir(self.inbox / w))]

    def reject(self, src: str | Path, record: dict[str, Any], name: str | None = None) -> Path:
        """Move an unacceptable file aside into rejected/ with a `<name>.error.json` beside it,
        neither replacing anything there; `name` is its inbox name (by default the one its
        claimed name keeps)."""
        base = _short(original_name(os.path.basename(src)) if name is None else name)  # UTF-8
        dest = self.rejected / base
        while True:
            if not os.path.lexists(f"{dest}.error.json"):
                try:
                    fsutil.rename_noreplace(src, dest)
                    break
                except FileExistsError:
                    pass
            dest = self.rejected / f"{time.time_ns()}-{base}"
        record = {**record, "file": fsutil.printable(dest.name), "rejected_at": rfc3339()}
        try:
            fsutil.write_atomic(dest.with_name(dest.name + ".error.json"), dumps_pretty(record),
                                fsync=self.fsync)
        except OSError:  # no record without its file (a full disk): it goes back where it was
            with contextlib.suppress(OSError):
                fsutil.rename_noreplace(dest, src)
            raise
        return dest

    def rejection(self, record_name: str) -> dict[str, Any] | None:
        """The rejection record `record_name` in rejected/ (a `<name>.error.json`), or None."""
        return _read_json(self.rejected / record_name)

    def archive(self, where: str, claimed: str, job_id: str, ok: bool, reason: str = "") -> None:
        """Move a finished job's file to done/ or failed/ (with `<id>.reason.txt` on failure)."""
        dest = f"{self._done if ok else self._failed}/{job_id}.json"
        if not ok:
            try:
                fsutil.write_atomic(self.failed / f"{job_id}.reason.txt",
                                    (reason + "\n").encode(), fsync=False)
            except OSError as e:
                if not out_of_space(e):
                    raise
                log.warning("job %r: failed/%s.reason.txt not written (%s); its result holds "
                            "the error", job_id, job_id, e.strerror)
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path(where, claimed), dest)
        self.remove_status(job_id)
        self.clear_cancel(job_id)

    # -- status ---------------------------------------------------------------------------

    def write_status(self, job_id: str, doc: dict[str, Any]) -> None:
        """Record a job's live status: atomic (whole or absent), survives a crash of this process,
        not fsync'd (a power cut may lose the latest; results and job files are what is durable)."""
        doc = {**doc, "job_id": job_id, "updated_at": rfc3339()}
        self.status_files.write(_status_name(job_id), dumps(doc))

    def read_status(self, job_id: str) -> dict[str, Any] | None:
        """The live status of a job, or None."""
        return _read_json(Path(self._status_file(job_id)))

    def has_status(self, job_id: str) -> bool:
        """True when `job_id` has a live status file."""
        return os.path.exists(self._status_file(job_id))

    def _status_file(self, job_id: str) -> str:
        return f"{self._status}/{_status_name(job_id)}"

    def remove_status(self, job_id: str) -> None:
        """Forget a finished job's live status."""
        self.status_files.remove(_status_name(job_id))

    def statuses(self) -> list[dict[str, Any]]:
        """Every live status; a claimed job with no status file yet is queued."""
        out = []
        for name in sorted(os.listdir(self.status_dir)):
            if name.endswith(".json") and not name.startswith("."):
                doc = _read_json(self.status_dir / name)
                if doc:
                    out.append(doc)
        known = {d.get("job_id") for d in out}
        for where, claimed in self.claimed():
            doc = _read_json(Path(self.path(where, claimed))) or {}
            jid = doc.get("job_id")
            if isinstance(jid, str) and jid not in known:
                ex = doc.get("execution") or {}
                out.append({"job_id": jid, "state": "queued", "attempt": ex.get("attempt", 1),
                            "max_attempts": ex.get("max_attempts", 1),
                            "priority": ex.get("priority", 5), "file": claimed})
        return out

    # -- results ----------------------------------------------------------------------------

    def result_path(self, job_id: str) -> Path:
        """Where the result of `job_id` is (or will be)."""
        return Path(self._result_file(job_id))

    def _result_file(self, job_id: str) -> str:
        return f"{self._results}/{job_id}-result.json"

    def publish_result(self, job_id: str, doc: dict[str, Any]) -> bool:
        """Write the result of `job_id` now into a hidden file, which `sync_results` fsyncs and
        links under its name; False when the job has one already (it is never replaced)."""
        if self.has_result(job_id):
            return False
        fd, tmp = self._result_file_ahead()
        try:
            fsutil.write_all(fd, dumps_pretty(doc))
        except BaseException:
            os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        self._staged[job_id] = tmp
        return True

    def unstage(self, job_id: str) -> None:
        """Take back the result of `job_id` written in this pass, before it is linked."""
        tmp = self._staged.pop(job_id, None)
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _result_file_ahead(self) -> tuple[int, Path]:
        """The file made ahead, opened (a new one when it is not exactly the empty file made)."""
        tmp, self._next_result = self._next_result, None
        if tmp is not None and _untouched(tmp):
            return os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC), tmp
        return self._make_result_file()

    def _make_result_file(self) -> tuple[int, Path]:
        path = self.results / f"{_NEXT_RESULT}{os.getpid()}-{time.time_ns()}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        return os.open(path, flags, 0o644), path

    @property
    def unsynced(self) -> int:
        """How many results written wait for `sync_results`."""
        return len(self._staged)

    def sync_results(self) -> list[str]:
        """Make every result written since the last call durable under its name (each file
        fsync'd, then linked; one directory fsync); return the ids whose name was taken.
        On an error, what is not yet linked stays written, for the next call."""
        taken = []
        for job_id, tmp in list(self._staged.items()):
            if fsutil.publish_noreplace(tmp, self.result_path(job_id), fsync=self.fsync):
                self._unsynced_dir = True
            else:
                taken.append(job_id)
            del self._staged[job_id]
        if self._unsynced_dir and self.fsync:
            fsutil.fsync_dir(self.results)
        self._unsynced_dir = False
        return taken

    def probe_space(self) -> None:
        """Write PROBE_BYTES into the inbox's and the results' directories, and remove them;
        OSError when either has no room."""
        for d in (self.tmp, self.results):
            path = d / f".space-probe-{os.getpid()}"
            try:
                fsutil.write_atomic(path, bytes(PROBE_BYTES), fsync=False)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def premake_result(self) -> None:
        """Have an empty file ready for the next result: a new inode can take milliseconds
        on ext4 without a journal, and now no job is waiting for it."""
        if self._next_result is None:
            fd, self._next_result = self._make_result_file()
            os.close(fd)

    def sweep_results(self) -> list[str]:
        """Settle every file an earlier run made for a result: one holding a whole result
        never put under its name (the run stopped between writing and linking it) is put
        there now, durably; the rest (empty, torn, or a second name of a result, left by one
        killed between linking and unlinking) are removed. Returns the ids linked."""
        linked = []
        for name in os.listdir(self.results):
            if not (name.startswith(_NEXT_RESULT) and name.endswith(".tmp")):
                continue
            path = self.results / name
            job_id = safe_job_id(_read_json(path))
            try:
                if job_id and fsutil.publish_noreplace(path, self.result_path(job_id),
                                                       fsync=self.fsync):
                    linked.append(job_id)
                    continue
            except OSError as e:  # kept for the next start
                log.warning("result file %s could not be put under its name: %s", name, e)
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if linked and self.fsync:
            fsutil.fsync_dir(self.results)
        return linked

    def read_result(self, job_id: str) -> dict[str, Any] | None:
        """The result of `job_id` (written in this loop pass, or under its name), or None."""
        return _read_json(self._staged.get(job_id) or self.result_path(job_id))

    def has_result(self, job_id: str) -> bool:
        """True once `job_id` has its result (written in this loop pass, or under its name)."""
        return job_id in self._staged or os.path.exists(self._result_file(job_id))

    # -- cancel requests ----------------------------------------------------------------------

    def request_cancel(self, job_id: str) -> None:
        """Ask the supervisor to cancel `job_id` (ValueError unless it is a valid job id)."""
        if not JOB_ID_RE.fullmatch(job_id):
            raise ValueError(f"job id: expected {JOB_ID_TEXT}, got {job_id!r}")
        fsutil.write_atomic(self.cancel_dir / job_id, rfc3339().encode(), fsync=False)

    def cancel_requested(self, job_id: str) -> bool:
        """True when a cancel request for `job_id` is waiting."""
        return os.path.exists(f"{self._cancel}/{job_id}")

    def clear_cancel(self, job_id: str) -> None:
        """Drop a handled cancel request."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{self._cancel}/{job_id}")

    # -- idempotency keys ------------------------------------------------------------------------

    def _key_path(self, key: str) -> Path:
        return self.keys / hashlib.sha256(key.encode()).hexdigest()

    def archived(self, job_id: str) -> dict[str, Any] | None:
        """The document of a completed job, as archived in done/, or None."""
        return _read_json(self.done / f"{job_id}.json")

    def key_owner(self, key: str) -> str | None:
        """The job that holds idempotency `key`, or None."""
        try:
            return self._key_path(key).read_text().strip() or None
        except FileNotFoundError:
            return None

    def take_key(self, key: str, job_id: str) -> None:
        """Make `job_id` the durable holder of `key`."""
        fsutil.write_atomic(self._key_path(key), job_id.encode(), fsync=self.fsync)

    # -- submitting --------------------------------------------------------------------------------

    def submit(self, job_id: str, data: bytes) -> tuple[int, int]:
        """Stage a job file in .tmp (fsync) and link it into the inbox; refuse to replace one.
        Returns the file's (st_dev, st_ino): what it is wherever the supervisor moves it."""
        name = f"{job_id}.json"
        staged = self.tmp / f"{name}.{os.getpid()}"
        fsutil.write_atomic(staged, data, fsync=True)
        st = os.stat(staged)
        try:
            os.link(staged, self.inbox / name)
        finally:
            os.unlink(staged)
        fsutil.fsync_dir(self.inbox)
        return st.st_dev, st.st_ino

    def sweep_tmp(self, older_than: float = 3600.0) -> int:
        """Remove staging leftovers older than `older_than` seconds; return how many."""
        cutoff, n = time.time() - older_than, 0
        for entry in os.scandir(self.tmp):
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    n += 1
        return n



_NEXT_RESULT = ".next-result-"  #: prefix of the file made ahead for the next result


def _untouched(path: Path) -> bool:
    """True for the empty, singly linked regular file that premake_result made."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_size == 0


#: The most of an inbox name (in bytes) that claimed and rejected names keep: room for a
#: claim's prefix, a collision's prefix and ".error.json" within a name's 255 bytes.
_NAME_PART = 200


def _short(name: str) -> str:
    """`name` as valid UTF-8 (other bytes as \\xNN escapes, see `fsutil.printable`: the name
    goes into status and rejection documents), cut to its start and a digest of the whole
    when longer than _NAME_PART bytes."""
    text = fsutil.printable(name)
    if len(text.encode()) <= _NAME_PART:
        return text
    cut = text.encode()[:_NAME_PART - 18].decode(errors="ignore")
    return f"{cut}~{hashlib.sha256(os.fsencode(name)).hexdigest()[:12]}.json"


def original_name(claimed: str) -> str:
    """The inbox name a claimed file had (claiming prefixes a time and a sequence number);
    `queue-<message id>.json` for a job a shared queue delivered."""
    if (message_id := Spool.message_of(claimed)) is not None:
        return f"queue-{message_id}.json"
    parts = claimed.split("-", 2)
    if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
        return parts[2]
    return claimed


def job_name(name: str) -> bool:
    """Whether inbox entry `name` is a job file: `*.json`, not hidden (a writer's own
    temporary file may be)."""
    return name.endswith(".json") and name[0] != "."


def _status_name(job_id: str) -> str:
    """The name of a job's live status file in .status/."""
    return f"{job_id}.json"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        doc = loads(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None

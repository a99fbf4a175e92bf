"""A cgroup per job: limits, stats, whole-tree kill; cgroup v2 where delegated, v1 memory/pids else."""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path("/sys/fs/cgroup")


def _write(path: str | Path, value: str) -> None:
    """Unbuffered, checked write: a cgroup file reports errors on write, not on close."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _limit_memory_v1(group: str | Path, limit: int) -> None:
    """Set a v1 memory cgroup's memory and memory+swap limits to `limit` bytes. The kernel
    refuses a memory limit above memory+swap's: a raise sets that one first, a cut last."""
    now = _read(f"{group}/memory.limit_in_bytes").strip()
    raising = now.isdigit() and limit > int(now)
    if raising:
        _limit_memsw_v1(group, limit)
    _write(f"{group}/memory.limit_in_bytes", str(limit))
    if not raising:
        _limit_memsw_v1(group, limit)


def _limit_memsw_v1(group: str | Path, limit: int) -> None:
    with contextlib.suppress(OSError):  # no swap accounting: nothing to limit
        _write(f"{group}/memory.memsw.limit_in_bytes", str(limit))


def _read(path: str | Path) -> str:
    """The whole file with plain syscalls (cgroup files report no size); '' when unreadable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        return _pread_all(fd)
    except OSError:
        return ""
    finally:
        os.close(fd)


def _pread_all(fd: int) -> str:
    """The whole of an open file, read from its start (a cgroup file is rendered afresh).
    Only an empty read ends it: the kernel's rendered files return short reads before
    their end when the next line does not fit the page it renders into."""
    chunks, offset = [], 0
    while chunk := os.pread(fd, 65536, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks).decode(errors="replace")


def _keyed(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


def _own_paths() -> dict[str, str]:
    """This process's cgroup path per hierarchy: '' for v2, controller names for v1."""
    paths: dict[str, str] = {}
    for line in _read(Path("/proc/self/cgroup")).splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            paths[c] = path
    return paths


@dataclass
class Hierarchies:
    """Where job cgroups go on this host: a v2 parent, and v1 memory/pids parents."""

    v2: Path | None = None
    v2_controllers: frozenset[str] = frozenset()
    memory_v1: Path | None = None
    pids_v1: Path | None = None
    notes: list[str] = field(default_factory=list)
    #: parents made for this spool (not a delegated cgroup of the unit): removed at a stop
    owned: list[Path] = field(default_factory=list)

    @property
    def layers(self) -> list[str]:
        """The cgroup features jobs get here, e.g. ['cgroup-v2-kill', 'cgroup-v1-memory']."""
        out = []
        if self.v2 is not None:
            out.append("cgroup-v2-kill")
            out += [f"cgroup-v2-{c}" for c in sorted(self.v2_controllers)]
        if self.memory_v1 is not None:
            out.append("cgroup-v1-memory")
        if self.pids_v1 is not None:
            out.append("cgroup-v1-pids")
        return out

    def has_memory(self) -> bool:
        """True when job memory is limited by a cgroup (not only by RLIMIT_AS)."""
        return self.memory_v1 is not None or "memory" in self.v2_controllers

    def has_pids(self) -> bool:
        """True when a job's process count is limited by a cgroup."""
        return self.pids_v1 is not None or "pids" in self.v2_controllers


def probe(name: str, dry: bool = False) -> Hierarchies:
    """Find (and, unless `dry`, prepare) the parents of job cgroups named `name`.

    A dry probe changes nothing: it only says what a supervisor would get.
    """
    h = Hierarchies()
    own = _own_paths()
    if (ROOT / "cgroup.controllers").exists():
        _probe_v2_delegated(h, ROOT / own.get("", "/").lstrip("/"), dry)
    elif (ROOT / "unified" / "cgroup.procs").exists():
        h.v2 = _parent(h, "v2", ROOT / "unified" / own.get("", "/").lstrip("/") / name, dry)
    for ctl in ("memory", "pids"):
        if ctl in own and (ROOT / ctl / "cgroup.procs").exists():
            parent = _parent(h, ctl, ROOT / ctl / own[ctl].lstrip("/") / name, dry)
            setattr(h, f"{ctl}_v1", parent)
    return h


def _parent(h: Hierarchies, label: str, path: Path, dry: bool) -> Path | None:
    if dry:
        return path if os.access(path.parent, os.W_OK) else None
    try:
        made = _mkparent(path)
    except OSError as e:
        h.notes.append(f"{label}: {e}")
        return None
    h.owned.append(made)
    return made


def _mkparent(path: Path) -> Path:
    path.mkdir(exist_ok=True)
    probe_dir = path / f"probe-{os.getpid()}"
    probe_dir.mkdir(exist_ok=True)  # can we create children at all?
    probe_dir.rmdir()
    return path


def _probe_v2_delegated(h: Hierarchies, own: Path, dry: bool) -> None:
    """Pure v2 (a systemd host with Delegate=yes): move into a leaf, enable controllers below."""
    if dry:
        if os.access(own, os.W_OK):
            h.v2 = own
            h.v2_controllers = frozenset({"memory", "pids", "cpu"} & set(
                _read(own / "cgroup.controllers").split()))
        return
    try:
        leaf = own / "supervisor"
        leaf.mkdir(exist_ok=True)
        _write(leaf / "cgroup.procs", "0")
        wanted = {"memory", "pids", "cpu"} & set(_read(own / "cgroup.controllers").split())
        if wanted:
            _write(own / "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(wanted)))
        h.v2 = own
        h.v2_controllers = frozenset(wanted)
    except OSError as e:
        h.notes.append(f"v2 (delegated): {e}")


def _joinable(procs: tuple[str, ...], limits_memory: bool) -> JobCgroup:
    """A job's cgroup as its child knows it (see `JobCgroup.__reduce__`)."""
    return JobCgroup([], None, None, None, limits_memory, procs=procs)


@dataclass
class JobCgroup:
    """The cgroup directories of one job, one per hierarchy in use (per-job file paths are
    formatted as strings: joining Paths costs more than the syscalls)."""

    dirs: list[Path]
    v2: Path | None
    memory_v1: Path | None
    pids_v1: Path | None
    limits_memory: bool = False
    v2_controllers: frozenset[str] = frozenset()
    baseline: dict[str, int] = field(default_factory=dict)
    limited: tuple[int, int] | None = None  # (memory_mb, pids) last written
    procs: tuple[str, ...] = ()  # the cgroup.procs file of each dir, for join()
    #: counter files kept open while the cgroup lives (fd by path), read again at each job
    counters: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def create(cls, h: Hierarchies, name: str) -> JobCgroup:
        """Make the cgroup directories `name` in every hierarchy in use (before fork)."""
        cg = cls([], None, None, None, h.has_memory(), h.v2_controllers)
        try:
            if h.v2 is not None:
                cg.v2 = _fresh(h.v2 / name)
                cg.dirs.append(cg.v2)
            if h.memory_v1 is not None:
                cg.memory_v1 = _fresh(h.memory_v1 / name)
                cg.dirs.append(cg.memory_v1)
            if h.pids_v1 is not None:
                cg.pids_v1 = _fresh(h.pids_v1 / name)
                cg.dirs.append(cg.pids_v1)
        except OSError:
            cg.remove()  # none of it half-made
            raise
        cg.procs = tuple(os.path.join(d, "cgroup.procs") for d in cg.dirs)
        return cg

    def limit(self, memory_mb: int, pids: int, cpu_quota: float | None = None,
              mark_start: bool = True) -> None:
        """Set the next job's limits and, unless told its start is marked already, mark it.

        Limits equal to the last job's are not written again.
        """
        if self.limited != (memory_mb, pids):
            self._write_limits(memory_mb, pids, cpu_quota)
            self.limited = (memory_mb, pids)
        if mark_start:
            self.mark_start()

    def mark_start(self) -> None:
        """Reset the peak and note the counters the next job's `stats` count from: before it
        runs, or earlier while the process that will run it uses no CPU or memory (a spare
        waiting, boxed)."""
        if self.memory_v1 is not None:
            _write(f"{self.memory_v1}/memory.max_usage_in_bytes", "0")
        self.baseline = {k: v for k, v in self._raw_stats().items() if k != "memory_peak"}

    def _write_limits(self, memory_mb: int, pids: int, cpu_quota: float | None) -> None:
        mb = memory_mb << 20
        if self.v2 is not None:
            if "memory" in self.v2_controllers:
                for f, v in (("memory.max", mb), ("memory.swap.max", 0), ("memory.oom.group", 1)):
                    with contextlib.suppress(FileNotFoundError):
                        _write(f"{self.v2}/{f}", str(v))
            if "pids" in self.v2_controllers:
                _write(f"{self.v2}/pids.max", str(pids))
            if "cpu" in self.v2_controllers and cpu_quota:
                _write(f"{self.v2}/cpu.max", f"{int(cpu_quota * 100000)} 100000")
        if self.memory_v1 is not None:
            _limit_memory_v1(self.memory_v1, mb)
        if self.pids_v1 is not None:
            _write(f"{self.pids_v1}/pids.max", str(pids))

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled, it travels to the child that joins it: the child gets only what `join` and
        its rlimits need (its procs files, whether memory is limited), and no Path to build."""
        return (_joinable, (self.procs, self.limits_memory))

    def join(self) -> None:
        """Move the calling process into every directory (in the child, before any job code)."""
        for procs in self.procs:
            _write(procs, "0")

    def stats(self) -> dict[str, int]:
        """This job's peak memory (bytes), OOM kills, pids-limit hits and CPU (usec), as known."""
        return {k: v - self.baseline.get(k, 0) for k, v in self._raw_stats().items()}

    def _raw_stats(self) -> dict[str, int]:
        out: dict[str, int] = {}
        if self.v2 is not None:
            if "memory" in self.v2_controllers:
                peak = self._counter(f"{self.v2}/memory.peak").strip()
                if peak.isdigit():
                    out["memory_peak"] = int(peak)
                events = _keyed(self._counter(f"{self.v2}/memory.events"))
                if "oom_kill" in events:
                    out["oom_kill"] = events["oom_kill"]
            out["cpu_usec"] = _keyed(self._counter(f"{self.v2}/cpu.stat")).get("usage_usec", 0)
            if "pids" in self.v2_controllers:
                pev = _keyed(self._counter(f"{self.v2}/pids.events"))
                if "max" in pev:
                    out["pids_max_hit"] = pev["max"]
        if self.memory_v1 is not None:
            peak = self._counter(f"{self.memory_v1}/memory.max_usage_in_bytes").strip()
            if peak.isdigit():
                out["memory_peak"] = int(peak)
            oom = _keyed(self._counter(f"{self.memory_v1}/memory.oom_control"))
            out["oom_kill"] = oom.get("oom_kill", 0)
        if self.pids_v1 is not None:
            out["pids_max_hit"] = _keyed(self._counter(f"{self.pids_v1}/pids.events")).get("max", 0)
        return out

    def kill(self) -> None:
        """SIGKILL every process left in the job's cgroups (cgroup.kill where there is one)."""
        if self.v2 is not None:
            with contextlib.suppress(OSError):  # no cgroup.kill before Linux 5.14
                _write(f"{self.v2}/cgroup.kill", "1")
                return
        for d in self.dirs:
            for pid in _read(f"{d}/cgroup.procs").split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)

    def empty(self) -> bool:
        """True when no process (zombies included) is left in any of the job's cgroups.

        A job's processes are in all of its cgroups at once, so v2's `populated` flag
        answers for every hierarchy (reading `cgroup.procs` costs far more).
        """
        if self.v2 is not None:
            events = _keyed(self._counter(f"{self.v2}/cgroup.events"))
            if "populated" in events:
                return events["populated"] == 0
        return all(not _read(f"{d}/cgroup.procs").strip() for d in self.dirs if d.exists())

    def remove(self) -> bool:
        """Remove the directories; False while a process (or zombie) still holds one."""
        self.close()
        left = []
        for d in self.dirs:
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                left.append(d)
        self.dirs = left
        return not left

    def close(self) -> None:
        """Close the counter files kept open (they open again when next read)."""
        fds, self.counters = self.counters, {}
        for fd in fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)

    def _counter(self, path: str) -> str:
        """A counter file's text, read through its fd kept open (no open and close at each of
        a job's reads); '' when unreadable."""
        fd = self.counters.get(path)
        try:
            if fd is None:
                fd = self.counters[path] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            return _pread_all(fd)
        except OSError:
            return ""


def _fresh(path: Path) -> Path:
    """Create `path`, first clearing a stale one of the same name left by a crash."""
    try:
        path.mkdir()
    except FileExistsError:
        sweep_one(path)
        path.mkdir()
    return path


def sweep_one(path: Path) -> bool:
    """Kill what is left in a stale job cgroup and remove it; False while it is still held."""
    if (path / "cgroup.kill").exists():
        with contextlib.suppress(OSError):
            _write(path / "cgroup.kill", "1")
    for pid in _read(path / "cgroup.procs").split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def _job_dirs(h: Hierarchies) -> list[Path]:
    """Every job or slot cgroup below the parents in `h`."""
    return [child for parent in (h.v2, h.memory_v1, h.pids_v1) if parent is not None
            for child in (*parent.glob("job-*"), *parent.glob("slot-*"))]


def sweep(h: Hierarchies) -> int:
    """Remove every job cgroup a previous run left behind; return how many were found."""
    found = _job_dirs(h)
    for child in found:
        sweep_one(child)
    return len(found)


def remove_all(h: Hierarchies) -> bool:
    """Remove every job cgroup (killing what is in it) and the parents in `h.owned`; False
    while one is still held (by a dying process)."""
    left = [child for child in _job_dirs(h) if not sweep_one(child)]
    for parent in h.owned:
        try:
            parent.rmdir()
        except FileNotFoundError:
            pass
        except OSError:
            left.append(parent)
    return not left


class Pool:
    """Job cgroups kept from job to job: creating and removing them costs more than an echo job.

    Reuse needs a resettable peak: with a v2 memory controller each job gets a fresh cgroup.
    """

    def __init__(self, h: Hierarchies) -> None:
        self.h = h
        self.reusable = "memory" not in h.v2_controllers
        self.free: list[JobCgroup] = []
        self.draining: list[JobCgroup] = []  # released while a zombie still held them
        self.made = 0

    def acquire(self, job_name: str, memory_mb: int, pids: int) -> JobCgroup:
        """A cgroup for the next job, limits set, counters noted."""
        cg = self.take(job_name)
        cg.limit(memory_mb, pids)
        return cg

    def take(self, name: str) -> JobCgroup:
        """A cgroup for a job or a spare, its limits not yet set (`limit` does that)."""
        if self.free:
            return self.free.pop()
        if not self.reusable:
            return JobCgroup.create(self.h, f"job-{name}")
        for _ in range(64):  # a stale slot whose processes are still dying is skipped
            self.made += 1
            try:
                return JobCgroup.create(self.h, f"slot-{self.made - 1}")
            except FileExistsError:
                continue
        raise OSError(f"no free cgroup slot name below slot-{self.made}")

    def release(self, cg: JobCgroup) -> None:
        """Take back a finished job's cgroup (its processes already killed)."""
        if not cg.empty():
            self.draining.append(cg)
        elif self.reusable:
            self.free.append(cg)
        elif not cg.remove():
            self.draining.append(cg)

    def retry(self) -> None:
        """Release again what a zombie held last time (after the loop reaped it)."""
        held, self.draining = self.draining, []
        for cg in held:
            self.release(cg)

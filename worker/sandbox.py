"""Everything applied to a job child before its handler runs (DESIGN §5), in order.

`fork_job` forks the child, as PID 1 of a new PID namespace when the plan asks for
one. In the child, still privileged (`enter_privileged`): session, parent-death
signal, cgroups, network namespace. Then (`enter`): work dir, stdio, fds,
environment, rlimits, privilege drop, NO_NEW_PRIVS; after the payload is validated
(`confine`), Landlock and seccomp, last.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import select
import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from worker import landlock, syscall_filter
from worker.cgroups import JobCgroup

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x4000000, 0x8000000, 0x20000000, 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def prctl(option: int, arg: int = 0) -> None:
    """Call prctl(2); raise OSError on failure."""
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def set_name(name: str) -> None:
    """Name the calling process as `ps` and `top` show it (at most 15 bytes); best effort."""
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def unshare(flags: int) -> None:
    """Call unshare(2) (os.unshare exists only from Python 3.12); raise OSError on failure."""
    if _libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare: {os.strerror(err)}")


def reaped() -> Iterator[tuple[int, int, resource.struct_rusage]]:
    """Reap every exited child of this process now, without blocking: (pid, status, rusage)."""
    while True:
        try:
            pid, status, rusage = os.wait3(os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status, rusage


def become_subreaper() -> bool:
    """Make orphaned descendants of jobs come back to this process; False when refused."""
    try:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
    except OSError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Limits:
    """The resource limits of one job, already capped by the worker's settings."""

    memory_mb: int
    cpu_seconds: int
    max_processes: int
    max_open_files: int
    max_file_size_mb: int

    def as_dict(self) -> dict[str, int]:
        """Plain dict form for results and handlers."""
        return {s: getattr(self, s) for s in self.__slots__}


@dataclass(frozen=True)
class Plan:
    """What the supervisor decided for one job's box, before fork."""

    workdir: Path
    output_dir: Path
    limits: Limits
    env: dict[str, str]
    supervisor_pid: int
    cgroup: JobCgroup | None = None
    uid: int | None = None
    gid: int | None = None
    nproc: int | None = None
    new_net: bool = False
    pid_ns: bool = False
    landlock_abi: int = 0
    read_paths: tuple[str, ...] = ()
    seccomp: bytes | None = None
    layers: list[str] = field(default_factory=list)


def _vm_size() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def apply_rlimits(limits: Limits, cgroup_memory: bool, nproc: int | None) -> None:
    """Set rlimits: address space (only without a cgroup memory limit), CPU soft<hard, files, core."""
    mb = 1 << 20
    values = [(resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, limits.max_open_files),
              (resource.RLIMIT_FSIZE, limits.max_file_size_mb * mb)]
    if not cgroup_memory:
        values.append((resource.RLIMIT_AS, _vm_size() + limits.memory_mb * mb))
    if nproc is not None:
        values.append((resource.RLIMIT_NPROC, nproc))
    for res, value in values:
        resource.setrlimit(res, (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 2))


def make_workdir(workdir: Path, uid: int | None, gid: int | None) -> None:
    """Create the job's work dir (0700; kept if an earlier attempt made it), owned by the job user."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(workdir, 0o700)
    if uid is not None and gid is not None:
        os.chown(workdir, uid, gid)


def premake_workdir(scratch: Path, uid: int | None, gid: int | None) -> None:
    """A spare's work dir and empty stdout/stderr logs, made before its job is known."""
    make_workdir(scratch, uid, gid)
    for name in ("stdout.log", "stderr.log"):
        os.close(os.open(scratch / name, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        if uid is not None and gid is not None:
            os.chown(scratch / name, uid, gid)


def claim_workdir(scratch: Path, workdir: Path) -> None:
    """Rename a spare's work dir to its job's; an existing one (a retry's) is kept instead."""
    try:
        os.rename(scratch, workdir)
    except OSError:  # the job's dir exists (an earlier attempt): use it, drop the spare's
        shutil.rmtree(scratch, ignore_errors=True)


def redirect_stdio(workdir: Path) -> None:
    """stdin from /dev/null; stdout and stderr appended to files in the job's work dir."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, name in ((1, "stdout.log"), (2, "stderr.log")):
        out = os.open(workdir / name, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(out, fd)
        os.close(out)


def keep_only(fd: int, target: int = 3) -> int:
    """Move `fd` to `target` and close every other fd above stdio; return the new fd."""
    if fd != target:
        os.dup2(fd, target, inheritable=False)
        os.close(fd)
    os.closerange(target + 1, 1 << 20)
    return target


def scrub_environment(workdir: Path, extra: dict[str, str]) -> None:
    """Replace the environment with a minimal one: PATH, HOME, TMPDIR, LANG and `extra`."""
    os.environ.clear()
    os.environ.update(
        PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        HOME=str(workdir), TMPDIR=str(workdir), LANG="C.UTF-8", **extra,
    )


def enter_privileged(plan: Plan) -> list[str]:
    """The outer box, still privileged: session, PDEATHSIG, cgroups, namespaces; the layers."""
    os.setsid()
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if _forker_gone(plan.supervisor_pid):  # it died before PDEATHSIG was armed
        os._exit(1)
    layers = ["session", "pdeathsig"]
    if plan.cgroup is not None:
        plan.cgroup.join()
        layers += plan.layers
    if plan.new_net:
        unshare(CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
        layers.append("network-namespace")
    if plan.pid_ns:
        if os.getpid() != 1:
            raise OSError("the job was not forked into a PID namespace of its own")
        # PID 1 ignores signals it has no handler for: make SIGTERM end the job (and its namespace).
        signal.signal(signal.SIGTERM, lambda *_: os._exit(128 + signal.SIGTERM))
        layers.append("pid-namespace")
    return layers


_forker: tuple[int, int] | None = None  # (pid, pidfd) of the process that forks jobs
_own_pid_ns: tuple[int, int] | None = None  # (pid, fd) of that process's PID namespace


def fork_job(pid_ns: bool) -> int:
    """os.fork() for a job; with `pid_ns` the child is PID 1 of a new PID namespace.

    The caller stays in its namespace (only its next child goes into the new one), so the
    job is its direct child: no relay process. Raise OSError when the kernel refuses.
    """
    global _forker, _own_pid_ns
    me = os.getpid()
    if _forker is None or _forker[0] != me:
        _forker = (me, os.pidfd_open(me))
    if not pid_ns:
        return os.fork()
    if _own_pid_ns is None or _own_pid_ns[0] != me:
        _own_pid_ns = (me, os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC))
    unshare(CLONE_NEWPID)
    try:
        pid = os.fork()
    finally:
        if os.getpid() == me:  # the parent: its later children are born where it lives
            _setns(_own_pid_ns[1], CLONE_NEWPID)
    return pid


def _setns(fd: int, kind: int) -> None:
    if _libc.setns(fd, kind) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _forker_gone(expected: int) -> bool:
    """True when the process that forked us has died (checked after arming PDEATHSIG)."""
    parent = os.getppid()
    if parent == expected:
        return False
    if parent != 0 or _forker is None:  # reparented: it is gone
        return True
    # PID 1 of a new namespace sees no parent; the forker's pidfd is readable once it died.
    ready, _, _ = select.select([_forker[1]], [], [], 0)
    return bool(ready)


def pid_namespaces_work() -> bool:
    """Whether this process may give its children new PID namespaces (tried, then undone)."""
    try:
        fd = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        unshare(CLONE_NEWPID)
        _setns(fd, CLONE_NEWPID)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def enter(plan: Plan, pipe_fd: int) -> tuple[int, list[str]]:
    """Put the process that runs the job in its box; return the pipe's new fd and the layers."""
    layers = ["rlimits", "closed-fds", "scrubbed-environment"]
    os.umask(0o077)
    make_workdir(plan.workdir, plan.uid, plan.gid)
    redirect_stdio(plan.workdir)
    pipe_fd = keep_only(pipe_fd)
    scrub_environment(plan.workdir, plan.env)
    os.chdir(plan.workdir)
    cgroup_memory = plan.cgroup is not None and plan.cgroup.limits_memory
    apply_rlimits(plan.limits, cgroup_memory, plan.nproc if plan.uid is not None else None)
    if plan.uid is not None and plan.gid is not None:
        drop_privileges(plan.uid, plan.gid, None if plan.pid_ns else plan.supervisor_pid)
        layers.append(f"user:{plan.uid}")
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    layers.append("no-new-privs")
    return pipe_fd, layers


def drop_privileges(uid: int, gid: int, parent: int | None) -> None:
    """Become uid:gid with no supplementary groups; re-arm PDEATHSIG, which setuid clears."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def confine(plan: Plan, inputs: list[str]) -> list[str]:
    """Last steps before the handler runs: Landlock, then seccomp; return the layers applied."""
    layers = []
    if plan.landlock_abi:
        read = [*plan.read_paths, *inputs]
        write = [str(plan.workdir), str(plan.output_dir), os.devnull]
        landlock.restrict(read, write, plan.landlock_abi)
        layers.append(f"landlock-abi{plan.landlock_abi}")
    if plan.seccomp is not None:
        syscall_filter.load(plan.seccomp)
        layers.append("seccomp")
    return layers


def readable_runtime() -> tuple[str, ...]:
    """Paths a Python job must read to run: system dirs, the interpreter, and the import-path
    entries that loaded modules came from (not the working directory, which may be the spool)."""
    import sys

    paths = {"/usr", "/lib", "/lib64", "/bin", "/sbin", "/etc", "/proc", "/dev/urandom",
             "/dev/random", "/dev/zero", sys.prefix, sys.base_prefix, sys.exec_prefix}
    entries = sorted({os.path.abspath(p) for p in sys.path if p and os.path.isdir(p)},
                     key=len, reverse=True)
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not path:
            continue
        path = os.path.abspath(path)
        entry = next((e for e in entries if path.startswith(e + os.sep)), None)
        paths.add(entry or os.path.dirname(path))
    with contextlib.suppress(OSError):
        paths.add(os.path.realpath(sys.executable))
    return tuple(sorted(paths))

"""Everything applied to a job child before its handler runs (DESIGN §5), in order."""

from __future__ import annotations

import ctypes
import os
import resource
import signal
from dataclasses import dataclass
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)


def prctl(option: int, arg: int = 0) -> None:
    """Call prctl(2); raise OSError on failure."""
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


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


def _vm_size() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def apply_rlimits(limits: Limits, is_root: bool) -> None:
    """Set the job's rlimits: memory above the inherited address space, CPU (soft<hard), files, core."""
    mb = 1 << 20
    address_space = _vm_size() + limits.memory_mb * mb
    for res, value in (
        (resource.RLIMIT_CORE, 0),
        (resource.RLIMIT_NOFILE, limits.max_open_files),
        (resource.RLIMIT_FSIZE, limits.max_file_size_mb * mb),
        (resource.RLIMIT_AS, address_space),
    ):
        resource.setrlimit(res, (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 2))
    if not is_root:
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes))


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
    tmp = workdir / "tmp"
    tmp.mkdir(mode=0o700, exist_ok=True)
    os.environ.clear()
    os.environ.update(
        PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        HOME=str(workdir),
        TMPDIR=str(tmp),
        LANG="C.UTF-8",
        **extra,
    )


def enter(
    *, workdir: Path, limits: Limits, pipe_fd: int, supervisor_pid: int, env: dict[str, str]
) -> int:
    """Put the calling (freshly forked) process in its box; return the pipe's new fd."""
    os.setsid()
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != supervisor_pid:  # the supervisor died before PDEATHSIG was armed
        os._exit(1)
    os.umask(0o077)
    redirect_stdio(workdir)
    pipe_fd = keep_only(pipe_fd)
    scrub_environment(workdir, env)
    os.chdir(workdir)
    apply_rlimits(limits, os.geteuid() == 0)
    return pipe_fd

"""Everything applied to a job child before its handler runs (DESIGN §5), in order.

`fork_job` forks the child, as PID 1 of a new PID namespace when the plan asks for
one. In the child, still privileged (`enter_privileged`): session, parent-death
signal, cgroups, network namespace. Then (`enter`): work dir, its Landlock ruleset
(built while the zygote's anchors are open, enforced later), stdio, fds,
environment, rlimits, privilege drop, NO_NEW_PRIVS; after the payload is validated
(`confine`), Landlock enforced and seccomp, last.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # `signal` without its enum wrappers
import contextlib
import ctypes
import errno
import os
import resource
import select
import signal
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields

from worker import landlock, syscall_filter
from worker.cgroups import JobCgroup

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x4000000, 0x8000000, 0x20000000, 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
# Bound once at import, in the zygote: a child's first `_libc.name` would build the function.
_prctl, _unshare, _setns = _libc.prctl, _libc.unshare, _libc.setns
_clearenv = _libc.clearenv


def prctl(option: int, arg: int = 0) -> None:
    """Call prctl(2); raise OSError on failure."""
    if _prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def set_name(name: str) -> None:
    """Name the calling process as `ps` and `top` show it (at most 15 bytes); best effort."""
    _prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


def unshare(flags: int) -> None:
    """Call unshare(2) (os.unshare exists only from Python 3.12); raise OSError on failure."""
    if _unshare(flags) != 0:
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


_CAP_SYS_NICE = 23


def may_raise_priority() -> bool:
    """Whether this process may lower its nice value back to 0 once it raised it: it has
    CAP_SYS_NICE (a unit's bounding set may lack it) or an RLIMIT_NICE that allows 0."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                if int(line.split()[1], 16) >> _CAP_SYS_NICE & 1:
                    return True
                break
    return resource.getrlimit(resource.RLIMIT_NICE)[0] >= 20


def become_subreaper() -> bool:
    """Make orphaned descendants of jobs come back to this process; False when refused."""
    try:
        prctl(PR_SET_CHILD_SUBREAPER, 1)
    except OSError:
        return False
    return True


@dataclass(frozen=True)  # no slots: a slotted frozen dataclass unpickles in Python code
class Limits:
    """The resource limits of one job, already capped by the worker's settings."""

    memory_mb: int
    cpu_seconds: int
    max_processes: int
    max_open_files: int
    max_file_size_mb: int

    def as_dict(self) -> dict[str, int]:
        """Plain dict form for results and handlers."""
        return dict(self.__dict__)


LIMIT_FIELDS = tuple(f.name for f in fields(Limits))  #: the limits a job may ask for


@dataclass(frozen=True)
class Plan:
    """What the supervisor decided for one job's box, before fork."""

    workdir: str  # paths as strings: the child then never runs pathlib's code
    output_dir: str
    limits: Limits
    env: dict[str, str]
    cgroup: JobCgroup | None = None
    uid: int | None = None
    gid: int | None = None
    nproc: int | None = None
    new_net: bool = False
    pid_ns: bool = False
    landlock_abi: int = 0
    read_paths: tuple[str, ...] = ()
    seccomp: bytes | None = None
    unix_sockets: bool = True  # False: `seccomp` refuses socket(AF_UNIX) too
    layers: list[str] = field(default_factory=list)

    @property
    def sealed(self) -> bool:
        """Whether nothing of the job can act once its PID 1 is reaped: it is PID 1 of its
        own PID namespace (the kernel ends the rest first), unprivileged, and without unix
        sockets, so it can have handed no fd of its own to another process. What it used
        may then serve a later job (a blank work dir, a network namespace)."""
        return self.pid_ns and self.uid not in (None, 0) and not self.unix_sockets

    @property
    def kept_net(self) -> bool:
        """Whether a network namespace an earlier job used may serve this one: the job gets
        no network, and is sealed (as unprivileged, it cannot change the namespace)."""
        return self.new_net and self.sealed


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
    values.append((resource.RLIMIT_CPU, limits.cpu_seconds))
    root = os.geteuid() == 0
    for res, value in values:
        hard = value + 2 if res == resource.RLIMIT_CPU else value
        if not root:  # (a spare, after dropping privileges) a hard limit can only go down
            ceiling = resource.getrlimit(res)[1]
            hard = hard if ceiling == resource.RLIM_INFINITY else min(hard, ceiling)
        resource.setrlimit(res, (min(value, hard), hard))


def make_workdir(workdir: str, uid: int | None, gid: int | None) -> None:
    """Create the job's work dir (0700; kept if an earlier attempt made it), owned by the job user."""
    try:  # noqa: SIM105 - in every child: contextlib.suppress would run contextlib's code too
        os.mkdir(workdir, 0o700)
    except FileExistsError:
        pass
    if uid is not None and gid is not None:
        os.chown(workdir, uid, gid)


def premake_workdir(scratch: str, uid: int | None, gid: int | None) -> None:
    """A spare's work dir and empty stdout/stderr logs, made before its job is known."""
    make_workdir(scratch, uid, gid)
    for name in ("stdout.log", "stderr.log"):
        fd = open_log(f"{scratch}/{name}")
        if uid is not None and gid is not None:
            os.fchown(fd, uid, gid)
        os.close(fd)


def open_log(path: str) -> int:
    """Open a job's log for appending, as its own regular file: whatever an earlier attempt
    left under that name that is not one (a symlink to another job's result, a hard link,
    a FIFO) is replaced by a new, empty log. The caller is still root: never follow."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    try:  # O_NONBLOCK: a FIFO there must not block the open
        fd = os.open(path, flags | os.O_CREAT | os.O_NONBLOCK, 0o600)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENXIO):  # a symlink; a FIFO with no reader
            raise
    else:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            os.set_blocking(fd, True)
            return fd
        os.close(fd)
    os.unlink(path)
    return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)


def redirect_stdio(workdir: str) -> None:
    """stdin from /dev/null; stdout and stderr appended to files in the job's work dir."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    for fd, name in ((1, "stdout.log"), (2, "stderr.log")):
        out = open_log(f"{workdir}/{name}")
        os.dup2(out, fd)
        os.close(out)


def keep_only(*fds: int) -> None:
    """Move `fds` to 3, 4, … in order and close every other fd above stdio."""
    moved = [os.dup(fd) for fd in fds]  # above every target, so no dup2 clobbers another
    for target, fd in enumerate(moved, start=3):
        os.dup2(fd, target, inheritable=False)
    os.closerange(3 + len(fds), 1 << 20)


#: The environment every job starts from; its work dir adds HOME and TMPDIR.
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": "C.UTF-8"}


_env_is_base = False  # True from base_environment() until the environment changes again


def base_environment() -> None:
    """Make this process's environment exactly BASE_ENV, in Python and in C (code a handler's
    prepare() runs may have called setenv() behind os.environ's back)."""
    global _env_is_base
    os.environ.clear()
    _clearenv()
    os.environ.update(BASE_ENV)
    _env_is_base = True


def scrub_environment(workdir: str, extra: dict[str, str]) -> None:
    """Replace the environment with a minimal one: PATH, HOME, TMPDIR, LANG and `extra`.

    Cheap in a zygote's child, whose environment is BASE_ENV already (the zygote set it
    last, and nothing of it runs between that and a fork): only the job's keys are set."""
    global _env_is_base
    if not _env_is_base:
        base_environment()
    _env_is_base = False
    environ = os.environ
    environ["HOME"] = environ["TMPDIR"] = workdir
    for key, value in extra.items():  # not update(): that runs _collections_abc's code too
        environ[key] = value


def enter_privileged(plan: Plan, net: int = -1) -> list[str]:
    """The outer box, still privileged: session, PDEATHSIG, cgroups, namespaces; the layers.

    `net` is the fd of a kept network namespace to join (see `Plan.kept_net`), -1 for a new one.
    """
    os.setsid()
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if _forker_gone():  # it died before PDEATHSIG was armed
        os._exit(1)
    layers = ["session", "pdeathsig"]
    if plan.cgroup is not None:
        plan.cgroup.join()
        layers += plan.layers
    if plan.new_net:
        if net >= 0:
            setns(net, CLONE_NEWNET)
            unshare(CLONE_NEWIPC | CLONE_NEWUTS)  # SysV objects outlive processes: always new
        else:
            unshare(CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)
        layers.append("network-namespace")
    if plan.pid_ns:
        if os.getpid() != 1:
            raise OSError("the job was not forked into a PID namespace of its own")
        # PID 1 ignores signals it has no handler for: make SIGTERM end the job (and its namespace).
        _signal.signal(signal.SIGTERM, lambda *_: os._exit(128 + signal.SIGTERM))
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
            setns(_own_pid_ns[1], CLONE_NEWPID)
    return pid


def setns(fd: int, kind: int) -> None:
    """Call setns(2): move this process into the namespace `fd` refers to; raise OSError."""
    if _setns(fd, kind) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _forker_gone() -> bool:
    """True when the process that forked us with `fork_job` has died (checked after arming
    PDEATHSIG)."""
    if _forker is None:
        return False  # not forked by fork_job: nothing to check against
    parent = os.getppid()
    if parent == _forker[0]:
        return False
    if parent != 0:  # reparented: it is gone
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
        setns(fd, CLONE_NEWPID)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def enter(plan: Plan, pipe_fd: int) -> tuple[int, Confinement, list[str]]:
    """Put a fresh child in its inner box; return the pipe's new fd (3), its confinement to
    finish (a Landlock ruleset at fd 4, or none) and the layers."""
    os.umask(0o077)
    make_workdir(plan.workdir, plan.uid, plan.gid)
    fds, ruleset = with_ruleset((pipe_fd,), landlock_ruleset(plan))
    layers = enter_early(plan, *fds, rlimits=True) + enter_late(plan, rlimits=False)
    return 3, Confinement(ruleset), layers


def enter_early(plan: Plan, *fds: int, rlimits: bool) -> list[str]:
    """The inner box up to what depends on the job, in its existing work dir: stdio, fds
    (`fds` moved to 3, 4, …), cwd, with `rlimits` the plan's rlimits, the user, NO_NEW_PRIVS."""
    os.umask(0o077)
    redirect_stdio(plan.workdir)
    keep_only(*fds)
    os.chdir(plan.workdir)  # the cwd and stdio follow the dir if it is renamed
    layers = ["closed-fds"]
    if rlimits:
        layers += _rlimits(plan)
    if plan.uid is not None and plan.gid is not None:
        forker = None if plan.pid_ns or _forker is None else _forker[0]
        drop_privileges(plan.uid, plan.gid, forker)
        layers.append(f"user:{plan.uid}")
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    layers.append("no-new-privs")
    return layers


def enter_late(plan: Plan, rlimits: bool) -> list[str]:
    """What depends on the job: its environment and, with `rlimits`, its rlimits (a spare
    lowers them after dropping privileges: they only ever go down)."""
    scrub_environment(plan.workdir, plan.env)
    return ["scrubbed-environment", *(_rlimits(plan) if rlimits else [])]


def _rlimits(plan: Plan) -> list[str]:
    cgroup_memory = plan.cgroup is not None and plan.cgroup.limits_memory
    apply_rlimits(plan.limits, cgroup_memory, plan.nproc if plan.uid is not None else None)
    return ["rlimits"]


def drop_privileges(uid: int, gid: int, parent: int | None) -> None:
    """Become uid:gid with no supplementary groups; re-arm PDEATHSIG, which setuid clears."""
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if parent is not None and os.getppid() != parent:
        os._exit(1)


def confine(plan: Plan, inputs: list[str], early: Confinement) -> list[str]:
    """Last steps before the handler runs: Landlock (its ruleset, made early, with the
    handler's `inputs`), then seccomp unless `early` loaded it; return the layers applied."""
    layers = []
    if early.ruleset >= 0:
        landlock.enforce(early.ruleset, inputs, plan.landlock_abi)
        layers.append(f"landlock-abi{plan.landlock_abi}")
    if plan.seccomp is not None:
        if not early.seccomp:
            syscall_filter.load(plan.seccomp)
        layers.append("seccomp")
        if not plan.unix_sockets:
            layers.append("no-unix-sockets")
    return layers


@dataclass(frozen=True, slots=True)
class Confinement:
    """Confinement prepared before the handler runs: the Landlock ruleset fd (made by `enter`
    or, in a spare, before its job is known), and whether seccomp is loaded already."""

    ruleset: int = -1
    seccomp: bool = False


def landlock_ruleset(plan: Plan) -> int:
    """The job's Landlock ruleset fd for the runtime and the plan's dirs (-1 without Landlock),
    to enforce later: made while this process still holds its zygote's anchors (the read
    paths' fds, see `landlock.anchor`), so before `keep_only` closes them."""
    if not plan.landlock_abi:
        return -1
    write = [plan.workdir, plan.output_dir, os.devnull]
    return landlock.ruleset(plan.read_paths, write, plan.landlock_abi, anchored=True)


def with_ruleset(fds: tuple[int, ...], ruleset: int) -> tuple[tuple[int, ...], int]:
    """`fds` for `keep_only`, with the Landlock `ruleset` last when there is one (-1: none),
    and the fd the ruleset has once they are moved to 3, 4, … (-1: none)."""
    if ruleset < 0:
        return fds, -1
    return (*fds, ruleset), 3 + len(fds)


def confine_early(plan: Plan, ruleset: int) -> Confinement:
    """In a spare: load seccomp (which denies nothing a spare still does) beside its Landlock
    `ruleset` (see `landlock_ruleset`); the job's input paths are added by `confine`."""
    if plan.seccomp is not None:
        syscall_filter.load(plan.seccomp)
    return Confinement(ruleset, plan.seccomp is not None)


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
    return outermost(paths)


def outermost(paths: Iterable[str]) -> tuple[str, ...]:
    """`paths` without those whose target lies below another's: a Landlock rule covers
    everything below its dir, so each left out is a rule less to add for every job (18 ->
    10 here). Kept paths keep their names: a zygote resolves them when it opens them."""
    real = sorted(((os.path.realpath(p), p) for p in paths), key=lambda rp: rp[0].split("/"))
    out: list[tuple[str, str]] = []
    for target, path in real:  # by components: a dir comes right before what is below it
        if not (out and (target + "/").startswith(out[-1][0].rstrip("/") + "/")):
            out.append((target, path))
    return tuple(sorted(path for _, path in out))

"""What this host lets us apply to a job, probed once at start, and each job's sandbox plan."""

from __future__ import annotations

import grp
import hashlib
import logging
import os
import pwd
from dataclasses import dataclass, field
from pathlib import Path

from worker import cgroups, landlock, sandbox, syscall_filter
from worker.cgroups import Hierarchies, Pool
from worker.config import Settings
from worker.errors import ConfigError
from worker.sandbox import Limits, Plan, readable_runtime

log = logging.getLogger("guestkit.isolation")


@dataclass
class Host:
    """The isolation layers available here, and the job user."""

    cgroups: Hierarchies | None = None
    pool: Pool | None = None
    landlock_abi: int = 0
    seccomp: bytes | None = None
    seccomp_sealed: bytes | None = None  # also refuses AF_UNIX sockets (jobs without network)
    uid: int | None = None
    gid: int | None = None
    namespaces: bool = False
    runtime: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)

    def layers(self) -> list[str]:
        """Every layer a job can get on this host."""
        out = ["session", "pdeathsig", "subreaper", "rlimits", "closed-fds",
               "scrubbed-environment", "no-new-privs"]
        if self.cgroups is not None:
            out += self.cgroups.layers
        if self.namespaces:
            out += ["pid-namespace", "network-namespace"]
        if self.uid is not None:
            out.append(f"user:{self.uid}")
        if self.landlock_abi:
            out.append(f"landlock-abi{self.landlock_abi}")
        if self.seccomp is not None:
            out.append("seccomp")
        if self.seccomp_sealed is not None:
            out.append("no-unix-sockets")
        return out


def cgroup_name(settings: Settings) -> str:
    """The parent cgroup of this spool's jobs: unique per spool, stable across restarts."""
    digest = hashlib.sha256(str(settings.jobs_dir.absolute()).encode()).hexdigest()[:10]
    return f"guestkit-{settings.pool}-{digest}"


def probe(settings: Settings, dry: bool = False) -> Host:
    """Find out which layers this host offers, as far as `settings.isolation` asks for them.

    `dry` changes nothing on the host (for `capabilities`); a supervisor's probe prepares cgroups.
    """
    want = set(settings.isolation)
    host = Host(runtime=readable_runtime())
    root = os.geteuid() == 0
    if "cgroup" in want:
        host.cgroups = cgroups.probe(cgroup_name(settings), dry)
        host.notes += host.cgroups.notes
        if not host.cgroups.layers:
            host.cgroups = None
        elif not dry:
            host.pool = Pool(host.cgroups)
    host.namespaces = root and bool(want & {"pid-namespace", "network-namespace"})
    if host.namespaces and "pid-namespace" in want and not sandbox.pid_namespaces_work():
        host.namespaces = False
        host.notes.append("namespaces unavailable: this process may not create PID namespaces")
    if "landlock" in want:
        host.landlock_abi = landlock.abi()
    if "seccomp" in want:
        try:
            host.seccomp = syscall_filter.compile_program()
            host.seccomp_sealed = syscall_filter.compile_program(unix_sockets=False)
        except (ImportError, OSError, RuntimeError) as e:
            host.notes.append(f"seccomp unavailable: {e}")
    if "user" in want and root:
        host.uid, host.gid = job_user(settings.user, settings.group)
    return host


def job_user(user: str, group: str) -> tuple[int | None, int | None]:
    """The uid and gid jobs run as: `auto` is the `guestkit` user if it exists, else nobody."""
    if user in ("", "root", "0"):
        return None, None
    names = ["guestkit", "nobody"] if user == "auto" else [user]
    for name in names:
        try:
            pw = pwd.getpwnam(name) if not name.isdigit() else pwd.getpwuid(int(name))
        except KeyError:
            continue
        return pw.pw_uid, _group(group) if group else pw.pw_gid
    raise ConfigError(f"setting 'user': no such user {user!r}")


def _group(group: str) -> int:
    """The gid of setting `group` (a name or a number); ConfigError when there is none."""
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"setting 'group': no such group {group!r}") from None


def unreachable(path: Path, uid: int, gid: int) -> Path | None:
    """The first ancestor of `path` that uid:gid may not traverse, or None when all are open."""
    for parent in [*reversed(path.absolute().parents), path.absolute()]:
        try:
            st = parent.stat()
        except FileNotFoundError:
            return None
        bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        if not st.st_mode & bit:
            return parent
    return None


def check_reachable(host: Host, *dirs: Path) -> None:
    """Raise ConfigError when the job user cannot reach one of `dirs` (a 0700 parent, say)."""
    if host.uid is None or host.gid is None:
        return
    for d in dirs:
        blocker = unreachable(d, host.uid, host.gid)
        if blocker is not None:
            raise ConfigError(
                f"{d}: jobs run as uid {host.uid} and cannot enter {blocker} "
                f"(mode {blocker.stat().st_mode & 0o7777:o}); open it (chmod o+x) or set "
                "'user' to a user that can, or 'root' to run jobs as root"
            )


def open_output_dir(host: Host, output_dir: Path) -> None:
    """Create the output dir; when jobs run as another user, make it writable by their group,
    but only if it is new or empty: a directory in use (`/`, say) is never changed."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"output dir {output_dir} cannot be made: {e.filename}: "
                          f"{e.strerror}") from None
    if host.gid is not None:
        st = output_dir.stat()
        if st.st_gid != host.gid or st.st_mode & 0o070 != 0o070:
            if any(output_dir.iterdir()):
                raise ConfigError(
                    f"output dir {output_dir}: jobs run as uid {host.uid}, gid {host.gid} and "
                    f"may not write it, and it is left as it is because it is not empty: make it "
                    f"theirs (chgrp {host.gid} {output_dir}; chmod g+rwx {output_dir}) or name "
                    "a new or empty directory")
            # no setgid bit: jobs already run with this gid, and RestrictSUIDSGID= forbids it
            os.chown(output_dir, -1, host.gid)
            os.chmod(output_dir, (st.st_mode & 0o7777) | 0o070)
            log.info("output dir %s: group %d may write (jobs run as uid %d)", output_dir,
                     host.gid, host.uid)


def plan(host: Host, settings: Settings, *, workdir: Path, limits: Limits, env: dict[str, str],
         job_name: str, needs_network: bool) -> Plan:
    """Decide one job's sandbox: create its cgroup now, list the rest for the child to apply."""
    cg = host.pool.acquire(job_name, limits.memory_mb, limits.max_processes) if host.pool else None
    return _plan(host, settings, cg, workdir, limits, env, needs_network)


def spare_plan(host: Host, settings: Settings, name: str) -> Plan:
    """A spare's outer box: a cgroup whose limits its job's dispatch sets, no network.

    The work dir is the spare's scratch dir (`work/.<name>`), made while it waits and renamed
    to its job's; limits and environment are placeholders: the spare's order replaces them.
    """
    cg = host.pool.take(name) if host.pool else None
    caps = Limits(memory_mb=settings.memory_limit_mb, cpu_seconds=settings.cpu_limit_seconds or 1,
                  max_processes=settings.max_processes, max_open_files=settings.max_open_files,
                  max_file_size_mb=settings.max_file_size_mb)
    scratch = settings.work_dir.absolute() / f".{name}"
    return _plan(host, settings, cg, scratch, caps, {}, needs_network=False)


def nproc(limits: Limits, settings: Settings) -> int:
    """RLIMIT_NPROC for a job (per uid, so it covers every slot's jobs of the job user)."""
    return limits.max_processes * settings.max_concurrent


def _plan(host: Host, settings: Settings, cg: cgroups.JobCgroup | None, workdir: Path,
          limits: Limits, env: dict[str, str], needs_network: bool) -> Plan:
    want = set(settings.isolation)
    sealed = not needs_network and host.seccomp_sealed is not None  # no unix sockets either
    return Plan(
        workdir=str(workdir), output_dir=str(settings.output_dir.absolute()), limits=limits,
        env=env,
        cgroup=cg, uid=host.uid, gid=host.gid,
        nproc=nproc(limits, settings),
        new_net=host.namespaces and not needs_network and "network-namespace" in want,
        pid_ns=host.namespaces and "pid-namespace" in want,
        landlock_abi=host.landlock_abi, read_paths=host.runtime,
        seccomp=host.seccomp_sealed if sealed else host.seccomp, unix_sockets=not sealed,
        layers=host.cgroups.layers if host.cgroups is not None else [],
    )

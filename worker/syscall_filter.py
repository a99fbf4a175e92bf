"""seccomp deny-list: compiled once to BPF in the supervisor, loaded in each child with prctl."""

from __future__ import annotations

import ctypes
import errno
import os
import socket
from typing import Any

#: Syscalls a job never needs; they fail with EPERM.
DENIED = (
    "mount", "umount2", "unshare", "setns", "pivot_root", "chroot", "swapon", "swapoff",
    "reboot", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "open_by_handle_at", "name_to_handle_at", "acct", "quotactl", "lookup_dcookie",
    "process_vm_writev", "fanotify_init", "iopl", "ioperm", "pidfd_getfd",
)
#: Syscalls that end the job at once (SIGSYS): debugging other processes.
KILLED = ("ptrace", "process_vm_readv")

_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl  # bound at import, in the zygote, not in every child


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def compile_program(denied: tuple[str, ...] = DENIED, killed: tuple[str, ...] = KILLED,
                    unix_sockets: bool = True) -> bytes:
    """Build the filter with libseccomp (pyseccomp) and return its BPF bytes; raise ImportError.

    Without `unix_sockets`, socket(AF_UNIX, ...) fails too (socketpair does not): a job then
    has no way to reach another process's socket, so it can hand no fd to anyone.
    """
    import pyseccomp

    f = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
    if not unix_sockets:
        f.add_rule(pyseccomp.ERRNO(errno.EPERM), "socket",
                   pyseccomp.Arg(0, pyseccomp.EQ, socket.AF_UNIX))
    for name in denied:
        try:
            f.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
        except (ValueError, RuntimeError, OSError):
            continue  # not a syscall on this architecture
    for name in killed:
        f.add_rule(pyseccomp.KILL_PROCESS, name)
    import tempfile  # here: tempfile imports random, whose re-seed then runs in every fork

    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        return out.read()


def prepare(*programs: bytes | None) -> None:
    """In a zygote: build once the structure `load` hands the kernel for each program, so
    that a child only makes the call (building it cost a fresh child about 80 us)."""
    for program in programs:
        if program is not None:
            _prepared[program] = _fprog(program)


def _fprog(program: bytes) -> tuple[Any, ...]:
    """(the program's buffer, the sock_fprog that points at it, a reference to pass that)."""
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    return buf, prog, ctypes.byref(prog)


_prepared: dict[bytes, tuple[Any, ...]] = {}


def load(program: bytes) -> None:
    """Install a compiled filter on the calling process (needs NO_NEW_PRIVS); irreversible."""
    _, _, ref = _prepared.get(program) or _fprog(program)
    if _prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ref, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"seccomp: {os.strerror(err)}")

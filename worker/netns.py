"""Network namespaces a zygote keeps and lends to one job child at a time.

Making a network namespace and tearing it down costs about half a millisecond of kernel
CPU per job (a loopback device, sysctl tables, and the cleanup worker). An empty one is
as good as new for a job that cannot change it: a job user without CAP_NET_ADMIN cannot
bring its loopback up, route, filter or set sysctls, and its sockets die with its
processes. So a namespace goes back to the pool only when the child it was lent to is
reaped, and only children that are PID 1 of their own PID namespace borrow one: the
kernel ends every process of that namespace before its PID 1 can be reaped.
"""

from __future__ import annotations

import os

from worker.sandbox import CLONE_NEWNET, setns, unshare


class NetPool:
    """Empty network namespaces (as fds) of one zygote: free, or lent to a live child."""

    def __init__(self) -> None:
        self.free: list[int] = []
        self.lent: dict[int, int] = {}  # child pid -> namespace fd

    def lend(self) -> int:
        """The fd of a namespace no live child uses; a new one when none is free."""
        return self.free.pop() if self.free else make()

    def lent_to(self, pid: int, fd: int) -> None:
        """`fd` (from `lend`) now belongs to child `pid` until it is reaped."""
        self.lent[pid] = fd

    def back(self, fd: int) -> None:
        """`fd` was lent but no child took it (the fork failed)."""
        self.free.append(fd)

    def reaped(self, pid: int) -> None:
        """Child `pid` is gone, and with it every process of its PID namespace."""
        fd = self.lent.pop(pid, None)
        if fd is not None:
            self.free.append(fd)

    def close(self) -> None:
        """Let go of every free namespace (the kernel frees each with its last reference)."""
        for fd in self.free:
            os.close(fd)
        self.free = []


def make() -> int:
    """Create a network namespace and return an fd that keeps it; the caller stays where it was."""
    own = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        unshare(CLONE_NEWNET)
        try:
            return os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            setns(own, CLONE_NEWNET)
    finally:
        os.close(own)

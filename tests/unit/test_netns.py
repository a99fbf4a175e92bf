"""The zygote's pool of network namespaces: one live child per namespace, back only when reaped."""

from __future__ import annotations

import os

import pytest

from worker.netns import NetPool

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creating namespaces needs root")


def _ino(fd: int) -> int:
    return os.fstat(fd).st_ino


def test_a_namespace_is_lent_to_one_child_at_a_time_and_back_when_reaped() -> None:
    own = os.stat("/proc/self/ns/net").st_ino
    pool = NetPool()
    try:
        a, b = pool.lend(), pool.lend()
        pool.lent_to(101, a)
        pool.lent_to(102, b)
        assert len({_ino(a), _ino(b), own}) == 3  # two new namespaces, neither ours
        assert os.stat("/proc/self/ns/net").st_ino == own  # making them left us where we were
        pool.reaped(999)  # not a borrower: nothing changes
        assert pool.free == []
        pool.reaped(101)
        c = pool.lend()
        assert _ino(c) == _ino(a)  # the reaped child's namespace serves the next one
        pool.back(c)  # a fork that failed gives it back at once
        assert pool.lend() == c
    finally:
        for fd in [*pool.free, *pool.lent.values()]:
            os.close(fd)

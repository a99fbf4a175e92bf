"""The zygote's pool of network namespaces: one live child per namespace, back only when reaped."""

from __future__ import annotations

import os

import pytest

from worker.netns import NetPool


def _ino(fd: int) -> int:
    return os.fstat(fd).st_ino


@pytest.mark.skipif(os.geteuid() != 0, reason="creating namespaces needs root")
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


def test_only_a_sealed_job_without_network_may_borrow_one() -> None:
    from worker.sandbox import Limits, Plan

    def plan(**kw: object) -> Plan:
        base: dict[str, object] = {"workdir": "/w", "output_dir": "/o", "env": {},
                                   "limits": Limits(1, 1, 1, 1, 1), "new_net": True,
                                   "pid_ns": True, "uid": 990, "gid": 990,
                                   "unix_sockets": False}
        return Plan(**{**base, **kw})  # type: ignore[arg-type]

    assert plan().kept_net
    assert not plan(uid=0).kept_net  # root under another name can change a namespace
    assert not plan(uid=None).kept_net
    assert not plan(pid_ns=False).kept_net  # reaping it would not prove its processes gone
    assert not plan(new_net=False).kept_net
    assert not plan(unix_sockets=True).kept_net  # it may have handed an fd to another job

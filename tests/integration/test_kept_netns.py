"""Network namespaces kept between jobs: one live job each, nothing carried from one job to the next.

Needs root (namespaces, the job user). A work dir being recycled is the sign that its
job's PID 1 was reaped, which is also when the zygote takes its namespace back.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import psutil
import pytest
from conftest import Worker, job, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and the job user need root")


def _reaped(w: Worker, job_id: str) -> None:
    def recycled() -> bool:
        return not (w.work / job_id).exists() and any((w.work / ".blank").iterdir())
    wait_until(recycled, [w.work, w.work / ".blank"], 20, f"{job_id} to be reaped")


def _probe(w: Worker, job_id: str, *actions: list[object]) -> list[str]:
    w.drop(job(job_id, "test.probe", {"actions": [list(a) for a in actions]}))
    res = w.wait_result(job_id)
    assert res["status"] == "completed", res
    assert "network-namespace" in res["isolation"]
    outcomes: list[str] = res["data"]["outcomes"]
    return outcomes


def test_a_kept_namespace_holds_nothing_of_the_job_before(
        make_worker: Callable[..., Worker]) -> None:
    w = make_worker("--max-concurrent", "1", "--no-spares").start()
    first = _probe(w, "first", ["netns", None], ["udp_daemon", 4242], ["udp_bind", 4242])
    assert first[1:] == ["ok bound", "OSError: errno 98"]  # while it lived, its daemon held it
    _reaped(w, "first")
    second = _probe(w, "second", ["netns", None], ["udp_bind", 4242], ["loopback_up", None])
    assert second[0] == first[0]  # the same namespace, kept
    assert second[1] == "ok bound"  # the daemon and its socket died with their job
    assert second[2] == "PermissionError: errno 1"  # and the job user cannot change it


def test_jobs_alive_at_once_never_share_one(make_worker: Callable[..., Worker]) -> None:
    w = make_worker("--max-concurrent", "2", "--no-spares").start()
    w.drop(job("long", "test.probe", {"actions": [["netns", None], ["sleep", 5]]}))
    wait_until(lambda: "[long] running:" in w.log(), [w.base], 20, "the long job to start")
    short = _probe(w, "short", ["netns", None])
    long = w.wait_result("long")["data"]["outcomes"]
    assert long[1] == "ok None"  # it slept through the short one's whole life
    assert short[0] != long[0]


def test_jobs_running_as_root_get_a_new_one_each(make_worker: Callable[..., Worker]) -> None:
    """A root job can change its namespace, so none is kept after it: what one job set up
    (here its loopback brought up) is not there for the next."""
    w = make_worker("--max-concurrent", "1", "--no-spares", "--user", "root").start()
    assert _probe(w, "changer", ["loopback_up", None], ["loopback_is_up", None]) == \
        ["ok 0", "ok True"]
    [pid] = (int(p) for p in re.findall(r"\[changer\] running: pid (\d+)", w.log()))
    wait_until(lambda: not psutil.pid_exists(pid), [w.base], 20, "changer to be reaped")
    assert _probe(w, "next", ["loopback_is_up", None]) == ["ok False"]

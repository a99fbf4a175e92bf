"""Spare children: boxed before their job exists, one per free slot, each used at most once."""

from __future__ import annotations

import os
import re
import signal
import socket

import psutil
from conftest import Worker, idle_spares, job, wait_gone, wait_until


def _spares(w: Worker) -> list[int]:
    """Pids of the spares waiting under the supervisor (nothing running in them)."""
    assert w.proc is not None
    return idle_spares(w.proc.pid)


def _waiting(w: Worker, n: int, without: tuple[int, ...] = ()) -> list[int]:
    """Wait until exactly `n` spares wait, none of them in `without`; return their pids."""
    def check() -> list[int] | None:
        pids = _spares(w)
        return pids if len(pids) == n and not set(pids) & set(without) else None

    return wait_until(check, [w.base, w.results], 20, f"{n} spare(s) waiting")


def _scratch(w: Worker) -> list[str]:
    """The work dirs spares made while waiting."""
    return sorted(p.name for p in w.work.glob(".spare-*"))


def _started_as(w: Worker, job_id: str) -> int:
    found = re.search(rf"\[{re.escape(job_id)}\] running: pid (\d+)", w.log())
    assert found, w.log()
    return int(found.group(1))


def test_each_free_slot_has_a_spare_and_a_job_starts_on_one(make_worker) -> None:
    w = make_worker("--max-concurrent", "2").start()
    before = _waiting(w, 2)
    w.drop(job("on-spare", "test.probe", {"actions": [["whoami", None], ["log", "via logging"]]}))
    res = w.wait_result("on-spare")
    assert res["status"] == "completed"
    used = _started_as(w, "on-spare")
    assert used in before  # the job ran in a process that existed before it arrived
    assert res["data"]["outcomes"][0].endswith("pid=1")  # PID 1 of its own namespace
    for layer in ("session", "pdeathsig", "pid-namespace", "rlimits", "no-new-privs"):
        assert layer in res["isolation"], res["isolation"]
    after = _waiting(w, 2, without=(used,))  # never reused: a fresh spare took its place
    wait_gone([used], 10, "the used spare to end")  # killed with its job, dying on its own time
    assert set(before) - {used} <= set(after)
    # the work dir it made while waiting became the job's, logs included
    assert sorted(p.name for p in (w.work / "on-spare").iterdir()) == ["stderr.log", "stdout.log"]
    assert "WARNING probe: via logging" in (w.work / "on-spare" / "stderr.log").read_text()
    wait_until(lambda: len(_scratch(w)) == 2, [w.work], 20, "one scratch dir per waiting spare")


def test_a_job_that_needs_the_network_is_forked_afresh(make_worker) -> None:
    w = make_worker("--max-concurrent", "1").start()
    spares = _waiting(w, 1)
    w.drop(job("netjob", "test.net", {}))
    res = w.wait_result("netjob")
    assert res["status"] == "completed"
    assert _started_as(w, "netjob") not in spares
    assert "network-namespace" not in res["isolation"]
    host = sorted(n for _, n in socket.if_nameindex())
    assert res["data"]["interfaces"] == host  # the host's network, not an empty namespace


def test_a_spare_runs_its_job_under_the_job_s_own_limits(make_worker) -> None:
    w = make_worker("--max-concurrent", "1").start()
    spares = _waiting(w, 1)
    actions = [["rlimit", "RLIMIT_NOFILE"], ["rlimit", "RLIMIT_CPU"], ["whoami", None]]
    w.drop(job("limited", "test.probe", {"actions": actions}, limits={"max_open_files": 100},
               timeout_seconds=30))
    res = w.wait_result("limited")
    assert res["status"] == "completed"
    assert _started_as(w, "limited") in spares
    nofile, cpu, who = res["data"]["outcomes"]
    assert nofile == "ok (100, 100)"  # lowered after the order, as the job user
    assert cpu == "ok (30, 32)"  # CPU seconds default to the timeout
    assert "uid=0" not in who


def test_a_retry_finds_its_work_dir_and_is_forked_afresh(make_worker) -> None:
    w = make_worker("--max-concurrent", "1").start()
    [first_spare] = _waiting(w, 1)
    w.drop(job("again", "test.retry", {"succeed_on": 2, "say": True}, max_attempts=2))
    [next_spare] = _waiting(w, 1, without=(first_spare,))
    res = w.wait_result("again")
    assert res["status"] == "completed" and res["data"]["attempt"] == 2
    first, second = (int(p) for p in re.findall(r"\[again\] running: pid (\d+)", w.log()))
    assert first == first_spare
    assert second != next_spare  # the work dir of attempt 1 exists: a fresh child appends to it
    assert _waiting(w, 1) == [next_spare]
    assert sorted(p.name for p in (w.work / "again").iterdir()) == ["stderr.log", "stdout.log"]
    assert (w.work / "again" / "stdout.log").read_text() == "attempt 1\nattempt 2\n"


def test_an_order_too_big_for_the_pipe_is_forked_afresh_and_the_spare_waits_on(
        make_worker) -> None:
    w = make_worker("--max-concurrent", "1").start()
    spares = _waiting(w, 1)
    big = {"actions": [["whoami", None]], "padding": "x" * 100_000}
    w.drop(job("big", "test.probe", big))
    res = w.wait_result("big")
    assert res["status"] == "completed"
    assert _started_as(w, "big") not in spares
    assert _waiting(w, 1) == spares  # untouched, still waiting for a job that fits
    w.drop(job("small", "test.probe", {"actions": []}))
    w.wait_result("small")
    assert _started_as(w, "small") == spares[0]


def test_a_spare_killed_while_waiting_is_replaced(make_worker) -> None:
    w = make_worker("--max-concurrent", "1").start()
    [victim] = _waiting(w, 1)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: f"spare child {victim} ended while waiting" in w.log(), [w.base], 20,
               "the supervisor to notice the dead spare")
    [fresh] = _waiting(w, 1, without=(victim,))
    w.drop(job("after-kill", "test.probe", {"actions": []}))
    assert w.wait_result("after-kill")["status"] == "completed"
    assert _started_as(w, "after-kill") == fresh


def test_drain_lets_every_spare_go(make_worker) -> None:
    w = make_worker("--max-concurrent", "3").start()
    spares = _waiting(w, 3)
    grandchildren = [c.pid for p in spares for c in psutil.Process(p).children(recursive=True)]
    assert w.stop() == 0
    wait_gone(spares + grandchildren, 10, "the spares to exit")
    assert "ended while waiting" not in w.log()  # retired, not lost
    (w.work / ".spare-999").mkdir()  # as a crash would leave one
    w.start("--no-spares", wait_ready=False)
    wait_until(lambda: w.log().count("ready:") == 2, [w.base], 30, "the second start")
    assert _scratch(w) == []  # swept at start


def test_no_spares_means_every_job_is_forked_when_it_starts(make_worker) -> None:
    w = make_worker("--max-concurrent", "2", "--no-spares").start()
    w.drop(job("plain", "test.probe", {"actions": [["whoami", None]]}))
    res = w.wait_result("plain")
    assert res["status"] == "completed"
    assert "pid-namespace" in res["isolation"]
    assert _spares(w) == []


def test_spares_that_die_boxing_themselves_are_never_given_a_job(make_worker) -> None:
    w = make_worker("--max-concurrent", "1")
    w.work.mkdir(parents=True)
    for n in range(3):  # a file where each of the first spares would make its dir
        (w.work / f".spare-{n}").write_text("in the way")
    w.start()
    wait_until(lambda: "jobs are forked afresh for 60 s" in w.log(), [w.base], 30,
               "three spares to fail and spares to pause")
    assert w.log().count("died while boxing itself") == 3
    assert "ended while waiting" not in w.log()  # never reported as ready
    w.drop(job("after", "test.probe", {"actions": []}))
    assert w.wait_result("after")["status"] == "completed"
    assert _spares(w) == []  # paused: the job was forked afresh

"""Handlers with a costly prepare() run their jobs from a warm zygote; the supervisor stays lean."""

from __future__ import annotations

import os
import re
import signal
import time
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from conftest import Worker, job, wait_gone, wait_until

from worker.supervisor import ZYGOTE_STEADY


def _zygote(w: Worker) -> int:
    return int(re.search(r"zygote (\d+) warms", w.log()).group(1))


def _first_failure(w: Worker) -> None:
    wait_until(lambda: re.search(r"gkw-zygote \d+ exited before it was ready", w.log()),
               [w.base], 30, "the warm zygote's first failure")


def test_a_warm_handler_runs_prepared_in_the_zygote_not_the_supervisor(worker: Worker) -> None:
    worker.drop(job("warm-1", "test.warm", {}))
    res = worker.wait_result("warm-1")
    assert res["status"] == "completed"
    assert res["data"]["prepared_in"] == [_zygote(worker)]  # prepared once, in the zygote
    assert _zygote(worker) != worker.proc.pid
    # what prepare() set in the environment, in Python or in C, is not a job's
    leaked = [k for k in res["data"]["env"] + res["data"]["program_env"] if k.startswith("GKW_")]
    assert leaked == []
    assert "PATH" in res["data"]["program_env"]
    worker.drop(job("cold-1"))  # an echo job runs on a spare of the lean forker
    assert worker.wait_result("cold-1")["status"] == "completed"


def test_if_the_zygote_dies_its_jobs_end_as_killed_and_a_new_one_starts(make_worker) -> None:
    w = make_worker("--kill-grace", "1").start()
    w.drop(job("warm-long", "test.warm", {"seconds": 30}, max_attempts=2))
    wait_until(lambda: "[warm-long] execution - warm" in w.log(), [w.jobs / ".status"], 20)
    old = _zygote(w)
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: len(re.findall(r"zygote \d+ warms", w.log())) == 2, [w.base], 20,
               "a new zygote")
    assert f"zygote {old} died" in w.log()
    res = w.wait_result("warm-long", timeout=60)  # retried from the new zygote
    assert res["status"] == "completed"
    assert res["execution_summary"]["attempt"] == 2


def test_zygotes_that_never_get_ready_are_retried_ever_later_and_jobs_wait(make_worker) -> None:
    """The test plugin ends any zygote importing it: a worker whose forker cannot start
    (an interpreter it may not run, a broken plugin) neither spins nor fails its jobs."""
    w = make_worker(env={"GKW_TEST_ZYGOTES_DIE": "1"}).start()
    w.drop(job("patient"))
    failed = r"gkw-(forker|zygote) \d+ exited before it was ready \(status 3; its error is " \
             r"above\); starting another in (\d+) s, jobs wait for it"
    pauses = wait_until(lambda: (p := [int(m[1]) for m in re.findall(failed, w.log())])
                        and p[-1] >= 2 and p, [w.base], 60, "pauses of 2 s")
    assert sorted(set(pauses)) == [1, 2], pauses  # doubling, the same for both zygotes
    assert "[patient] queued" in w.log() and w.result("patient") is None
    assert w.proc.poll() is None and "Traceback" not in w.log()
    assert w.stop() == 0
    assert [n for n in os.listdir(w.jobs / ".active") if "patient" in n]  # for the next start


def test_a_warm_zygote_that_cannot_prepare_holds_back_only_its_own_jobs(make_worker) -> None:
    """Its error reaches the log; its jobs wait, saying why, and fail at their deadline; the
    forker's jobs run meanwhile."""
    w = make_worker(env={"GKW_TEST_PREPARE_FAILS": "1"}).start()
    _first_failure(w)
    due = (datetime.now(UTC) + timedelta(seconds=3)).isoformat().replace("+00:00", "Z")
    w.drop(job("warm-blocked", "test.warm", {}, deadline=due))
    w.drop(job("plain-after"))
    assert w.wait_result("plain-after")["status"] == "completed"
    assert "RuntimeError: prepare() failed on purpose" in w.log()  # the zygote's own error
    res = w.wait_result("warm-blocked", timeout=30)
    assert res["error"]["code"] == "DEADLINE_EXCEEDED", res["error"]
    assert re.search(r"its deadline passed while it waited \(the gkw-zygote that forks it "
                     r"exited before it was ready, or soon after, or hung, \d+ time\(s\) in a "
                     r"row; it is started again after a pause \(see the log\)\)",
                     res["error"]["message"]), res["error"]


def test_a_warm_zygote_ready_at_last_starts_the_jobs_held_back_for_it(make_worker,
                                                                       tmp_path) -> None:
    flag = tmp_path / "prepare-fails"
    flag.touch()  # prepare() fails while it exists
    w = make_worker(env={"GKW_TEST_PREPARE_FAILS": str(flag)}).start()
    _first_failure(w)
    w.drop(job("warm-later", "test.warm", {}))
    wait_until(lambda: "[warm-later] waiting: the gkw-zygote that forks it" in w.log(),
               [w.base, w.jobs / ".status"], 30, "the job to wait for the zygote")
    flag.unlink()
    res = w.wait_result("warm-later", timeout=60)  # the next zygote, after its pause
    assert res["status"] == "completed", res
    first, *_, last = (int(pid) for pid in re.findall(r"zygote (\d+) warms", w.log()))
    assert res["data"]["prepared_in"] == [last] != [first]  # prepared once, by the new one


def _events(w: Worker) -> list[tuple[datetime, str]]:
    """(time, message) of each line of a worker started with --log-format json."""
    lines = [orjson.loads(line) for line in w.log().splitlines() if line.startswith("{")]
    return [(datetime.fromisoformat(d["ts"].replace("Z", "+00:00")), d["msg"]) for d in lines]


def test_a_zygote_that_dies_on_every_fork_is_restarted_ever_later_not_in_a_loop(
        make_worker) -> None:
    """The test plugin makes each zygote exit when it forks: the forker gets ready, forks its
    first spare and dies. Each restart waits twice as long as the one before."""
    w = make_worker(env={"GKW_TEST_ZYGOTES_DIE_ON_FORK": "1"}).start("--log-format", "json")
    died = re.compile(r"gkw-forker \d+ died \d+\.\d s after it got ready \(status 4\); its "
                      r"children were killed; starting another in (\d+) s, jobs wait for it")
    wait_until(lambda: "starting another in 4 s" in w.log(), [w.base], 60, "a pause of 4 s")
    events = _events(w)
    starts = [t for t, msg in events if re.fullmatch(r"forker \d+ forks jobs and spares", msg)]
    deaths = [(t, int(m[1])) for t, msg in events if (m := died.fullmatch(msg))]
    assert [pause for _, pause in deaths] == [1, 2, 4], deaths
    assert len(starts) in (3, 4)  # one start and two restarts; a third is 4 s away
    for (died_at, pause), started in zip(deaths, starts[1:], strict=False):
        assert (started - died_at).total_seconds() >= pause - 0.1  # it waited its pause
    assert w.proc.poll() is None and "Traceback" not in w.log()
    assert w.stop() == 0


def _ready_forker(w: Worker, before: list[int]) -> int:
    """The pid of the first forker ready (debug log) that is not one of `before`."""
    def found() -> int | None:
        pids = [int(p) for p in re.findall(r"gkw-forker (\d+) ready:", w.log())]
        return next((p for p in pids if p not in before), None)
    return wait_until(found, [w.base], 20, "a new forker to be ready")


@pytest.mark.slow
def test_a_zygote_that_ran_steadily_is_replaced_at_once_and_its_failures_forgotten(
        make_worker) -> None:
    """A forker killed soon after it got ready counts a failure (1 s pause); the next one,
    killed after ZYGOTE_STEADY, is replaced at once and the count is cleared: the one after
    it, killed at once, pauses 1 s again, not 2."""
    w = make_worker("--log-level", "debug").start()
    first = _ready_forker(w, [])
    os.kill(first, signal.SIGKILL)
    second = _ready_forker(w, [first])
    assert re.search(rf"gkw-forker {first} died \d+\.\d s after it got ready \(status -9\); "
                     r"its children were killed; starting another in 1 s", w.log()), w.log()
    time.sleep(ZYGOTE_STEADY + 0.5)  # what is tested is that much time alive, not an event
    os.kill(second, signal.SIGKILL)
    third = _ready_forker(w, [first, second])
    assert f"gkw-forker {second} died; its children were killed; starting a new one" in w.log()
    os.kill(third, signal.SIGKILL)
    wait_until(lambda: f"gkw-forker {third} died" in w.log(), [w.base], 20, "its death noted")
    assert re.search(rf"gkw-forker {third} died \d+\.\d s after it got ready \(status -9\); "
                     r"its children were killed; starting another in 1 s", w.log()), w.log()
    w.drop(job("after-all"))  # served by the fourth, after the pause
    assert w.wait_result("after-all")["status"] == "completed"


def test_kill_9_of_the_supervisor_takes_the_zygote_and_its_jobs(make_worker) -> None:
    w = make_worker().start()
    w.drop(job("warm-orphan", "test.warm", {"seconds": 60}))
    wait_until(lambda: "[warm-orphan] execution - warm" in w.log(), [w.jobs / ".status"], 20)
    pids = [_zygote(w)] + [c.pid for c in w.children()]
    w.kill()
    wait_gone(pids, 10, "the zygote and its job to die")


def test_a_job_ended_by_its_exit_is_measured_by_the_rusage_its_zygote_reports(make_worker) -> None:
    """Without a cgroup, a killed job's CPU and peak memory are its wait4 rusage, which the
    forker that reaped it sends to the supervisor."""
    w = make_worker("--isolation", "user").start()
    w.drop(job("measured", "test.probe", {"actions": [["hold", 64]], "then_sleep": True},
               timeout_seconds=1))
    res = w.wait_result("measured")
    assert res["error"]["code"] == "TIMEOUT", res
    m = res["metrics"]
    assert "cgroup" not in m, m
    assert 64 < m["peak_memory_mb"] < 160, m  # the 64 MiB it touched, and the interpreter
    assert 0 < m["cpu_seconds"] < 1.5, m  # touching them took CPU; sleeping after, none

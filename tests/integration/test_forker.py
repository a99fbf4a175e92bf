"""The lean forker forks every plain job and spare: the supervisor itself forks no job."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import orjson
import psutil
import pytest
from conftest import Worker, idle_spares, job, no_process_left, wait_gone, wait_until

from worker.zygote import FORK_REPLY_TIMEOUT


def _forkers(w: Worker) -> list[int]:
    return [int(p) for p in re.findall(r"forker (\d+) forks jobs", w.log())]


def _running(w: Worker, job_id: str, nth: int = 1) -> int:
    """Wait for the `nth` start of `job_id`; return its pid."""
    def started() -> int | None:
        found = re.findall(rf"\[{re.escape(job_id)}\] running: pid (\d+)", w.log())
        return int(found[nth - 1]) if len(found) >= nth else None

    return wait_until(started, [w.base, w.jobs / ".status"], 20, f"start {nth} of {job_id}")


def _kids(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children()


def _hold(job_id: str, **execution: object) -> dict[str, object]:
    return job(job_id, "test.probe", {"actions": [], "then_sleep": True}, **execution)


def test_the_supervisor_forks_no_job_the_forker_does(make_worker) -> None:
    w = make_worker("--max-concurrent", "1", "--no-spares").start()
    assert w.proc is not None
    [forker] = _forkers(w)
    w.drop(_hold("fresh"))
    pid = _running(w, "fresh")
    kids = {k.pid: k.name() for k in _kids(w.proc.pid)}  # the zygotes, nothing else
    assert kids[forker] == "gkw-forker"
    assert set(kids.values()) <= {"gkw-forker", "gkw-zygote"}, kids
    assert psutil.Process(pid).ppid() == forker
    # it is logged running once forked, and names itself once boxed (no event for that)
    wait_until(lambda: psutil.Process(pid).name() == "gkw-job", [w.jobs / ".status"], 10,
               "the job to name itself")
    w.kill()
    wait_gone([forker, pid], 10, "forker and job to die")


def test_spares_are_the_forker_s_and_their_jobs_run_at_normal_priority(make_worker) -> None:
    w = make_worker("--max-concurrent", "1").start()
    [forker] = _forkers(w)

    def waiting() -> list[int] | None:
        return idle_spares(forker, recursive=False) or None

    [spare] = wait_until(waiting, [w.base, w.work], 20, "a spare under the forker")
    w.drop(job("nice", "test.probe", {"actions": [["nice", None]]}))
    res = w.wait_result("nice")
    assert _running(w, "nice") == spare
    assert res["data"]["outcomes"] == ["ok 0"]  # it boxed itself at nice 10, not its job


def test_if_the_forker_dies_its_jobs_are_retried_from_a_new_one(make_worker) -> None:
    w = make_worker("--max-concurrent", "1", "--kill-grace", "1").start()
    [old] = _forkers(w)
    w.drop(_hold("orphaned", max_attempts=2))
    first = _running(w, "orphaned")
    os.kill(old, signal.SIGKILL)
    second = _running(w, "orphaned", nth=2)
    assert f"gkw-forker {old} died" in w.log()
    [_, new] = _forkers(w)
    assert new != old
    assert no_process_left([old, first])  # its job died with it
    assert psutil.Process(second).ppid() == new
    status = w.jobs / ".status" / "orphaned.json"
    wait_until(lambda: '"running"' in status.read_text() and orjson.loads(
        status.read_bytes())["attempt"] == 2, [status.parent], 20, "attempt 2 to run")
    w.kill()


def test_a_terminal_interrupt_does_not_reach_the_forker(make_worker) -> None:
    w = make_worker("--max-concurrent", "1", "--log-level", "debug").start()
    [forker] = _forkers(w)
    # it ignores them once set up; until then they stay blocked from the supervisor's fork
    wait_until(lambda: re.search(r"gkw-forker \d+ ready:", w.log()), [w.base], 20,
               "the forker to be ready")
    os.kill(forker, signal.SIGINT)  # as Ctrl-C sends it to the whole foreground group
    os.kill(forker, signal.SIGHUP)
    w.drop(job("after-ctrl-c"))
    assert w.wait_result("after-ctrl-c")["status"] == "completed"
    assert _forkers(w) == [forker]
    assert "died" not in w.log()


def test_the_forker_stays_lean_jobs_that_validate_a_model_fork_from_the_zygote(
        make_worker, tmp_path: Path) -> None:
    """Only the shipped handlers (no test plugins): echo is plain; guestkit.convert validates
    its payload with pydantic, so it forks from the zygote and pydantic never enters the
    forker that every echo job forks from (qemu-img is installed with the test packages)."""
    w = make_worker("--max-concurrent", "1", "--no-spares", env={"PYTHONPATH": ""}).start()
    [forker] = _forkers(w)
    assert re.search(r"zygote \d+ warms .*guestkit-convert", w.log()), w.log()
    # nor random: its at-fork hook re-seeds it from getrandom(2) in every child (about 30
    # page faults). Its modules may be built into the interpreter, so the calls are traced.
    out = tmp_path / "forker.trace"
    tracer = subprocess.Popen(["strace", "-f", "-p", str(forker), "-e", "trace=getrandom,exit_group",
                               "-o", str(out)], stderr=subprocess.PIPE, text=True)
    assert tracer.stderr is not None
    assert "attached" in tracer.stderr.readline()
    try:
        w.drop(job("plain"))
        assert w.wait_result("plain")["status"] == "completed"
    finally:
        tracer.send_signal(signal.SIGINT)  # strace detaches and writes out what it holds
        tracer.wait(20)
    calls = out.read_text()
    # the job child was traced: to its exit, or to the kill that ends a job once its result
    # is in (in a cgroup), which can come first as strace slows every syscall down
    ends = {int(pid) for pid in re.findall(r"^(\d+) +(?:exit_group\(0\)|\+\+\+ killed by SIGKILL)",
                                         calls, re.M)}
    assert ends - {forker}, calls
    assert "getrandom" not in calls, calls
    maps = {m.path for m in psutil.Process(forker).memory_maps()}
    assert any("libpython" in p or "/python3" in p for p in maps), maps  # the listing works
    assert not [p for p in maps if "pydantic" in p], maps


def _pids_dir() -> Path | None:
    """A fresh v1 pids cgroup for the test (None on a host without that hierarchy)."""
    root = Path("/sys/fs/cgroup/pids")
    if os.geteuid() != 0 or not (root / "cgroup.procs").exists():
        return None
    d = root / f"guestkit-fork-fails-{os.getpid()}"
    d.mkdir(exist_ok=True)
    return d


def test_a_job_whose_fork_fails_ends_failed_and_the_worker_goes_on(make_worker) -> None:
    """The kernel refuses the forker's fork (a pids limit): the job fails as INTERNAL with
    the reason, nothing waits for it, and the next job runs once forks are possible again."""
    box = _pids_dir()
    if box is None:
        pytest.skip("needs root and a cgroup v1 pids hierarchy to refuse a fork")
    w = make_worker("--no-spares").start()
    assert w.proc is not None
    try:
        for p in [psutil.Process(w.proc.pid), *psutil.Process(w.proc.pid).children()]:
            (box / "cgroup.procs").write_text(str(p.pid))  # supervisor and its zygotes
        (box / "pids.max").write_text((box / "pids.current").read_text())  # no task more
        w.drop(job("refused"))
        res = w.wait_result("refused")
        assert res["status"] == "failed" and res["error"]["code"] == "INTERNAL", res
        assert "could not be started" in res["error"]["message"], res
        assert "could not fork" in res["error"]["message"], res
        (box / "pids.max").write_text("max")
        w.drop(job("after"))
        assert w.wait_result("after")["status"] == "completed"
        assert w.stop() == 0
    finally:
        if w.proc.poll() is None:
            w.kill()
        wait_until(lambda: not (box / "cgroup.procs").read_text().strip(), [], 20,
                   "the worker's processes to leave the test cgroup")
        box.rmdir()


@pytest.mark.slow
def test_a_forker_that_stops_answering_is_killed_and_replaced(make_worker) -> None:
    """A hung forker (here SIGSTOP) would hold the whole loop in its wait for a pid: after
    FORK_REPLY_TIMEOUT the job fails as not started, and a new forker serves the next."""
    w = make_worker("--no-spares").start()
    [forker] = _forkers(w)
    os.kill(forker, signal.SIGSTOP)
    w.drop(job("unanswered"))
    res = w.wait_result("unanswered", timeout=FORK_REPLY_TIMEOUT + 20)
    assert res["status"] == "failed" and res["error"]["code"] == "INTERNAL", res
    assert "did not answer" in res["error"]["message"], res
    # a forker hanging on every fork must not be replaced in a loop: its death is a failure
    # (logged when the loop sees it die, which may come after the job's result)
    death = (f"gkw-forker {forker} was killed for not answering a fork; its children were "
             "killed; starting another in 1 s, jobs wait for it")
    wait_until(lambda: death in w.log(), [w.base], 20, "the hung forker's death to be logged")
    wait_until(lambda: len(_forkers(w)) == 2, [w.base], 20, "a new forker")
    assert no_process_left([forker])
    w.drop(job("answered"))
    assert w.wait_result("answered")["status"] == "completed"

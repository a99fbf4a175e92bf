"""Crash recovery, drain on SIGTERM, one supervisor per spool, retries, priority, idempotency."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import orjson
import psutil
import pytest
from conftest import Worker, job, no_process_left, wait_gone, wait_until


def _running(w: Worker, n: int) -> list[psutil.Process]:
    """Wait (on status-file events) until `n` jobs run; return the job processes."""

    def check() -> list[psutil.Process] | None:
        states = [orjson.loads(p.read_bytes()).get("state") for p in (w.jobs / ".status").glob("*.json")]
        return w.children() if states.count("running") >= n else None

    return wait_until(check, [w.jobs / ".status"], 20, f"{n} running job(s)")


@pytest.mark.slow
def test_kill_9_mid_run_then_restart_every_job_ends_once_within_max_attempts(make_worker) -> None:
    w = make_worker("--max-concurrent", "4", "--kill-grace", "1").start()
    ids = [f"crashy-{i}" for i in range(8)]
    for i, jid in enumerate(ids):
        attempts = 1 + i % 3
        w.drop(job(jid, "test.sleep", {"seconds": 1.5}, max_attempts=attempts))
    children = _running(w, 4)
    w.kill()  # SIGKILL the supervisor while 4 jobs run
    pids = [c.pid for c in children]
    wait_gone(pids, 10, "PDEATHSIG to end the jobs")
    w.start()
    for jid in ids:
        w.wait_result(jid, timeout=60)
    for i, jid in enumerate(ids):
        res = w.result(jid)
        max_attempts = 1 + i % 3
        assert len(w.runs(jid)) <= max_attempts, (jid, w.runs(jid))
        assert res["execution_summary"]["attempt"] <= max_attempts
        if res["status"] != "completed":
            assert res["error"]["code"] == "WORKER_LOST"
            assert "no attempts left" in res["error"]["message"]
    assert sorted(w.published()) == sorted(f"{j}-result.json" for j in ids)
    # the job file is archived right after its result is durable (same loop pass)
    wait_until(lambda: not any((w.jobs / ".active").iterdir()), [w.jobs / ".active"], 10,
               "every job file to be archived")
    # a result is linked under its name before its hidden name goes: look once all are done
    hidden = [p for p in w.results.iterdir() if p.name.startswith(".")]
    assert all(p.name.startswith(".next-result-") and p.stat().st_size == 0 for p in hidden), hidden


@pytest.mark.slow
def test_sigterm_with_4_running_lets_them_complete_and_exits_0(make_worker) -> None:
    w = make_worker("--max-concurrent", "4").start()
    for i in range(4):
        w.drop(job(f"drain-{i}", "test.sleep", {"seconds": 2}))
    pids = [c.pid for c in _running(w, 4)]
    assert w.stop() == 0
    for i in range(4):
        assert w.result(f"drain-{i}")["status"] == "completed"
    assert no_process_left(pids)
    assert "draining" in w.log()


@pytest.mark.slow
def test_drain_timeout_kills_and_requeues_then_a_second_term_skips_the_wait(make_worker) -> None:
    w = make_worker("--shutdown-timeout", "60", "--kill-grace", "1").start()
    w.drop(job("long", "test.sleep", {}, max_attempts=2))
    pids = [c.pid for c in _running(w, 1)]
    w.signal(signal.SIGTERM)
    wait_until(lambda: "draining" in w.log(), [w.base], 10, "the drain to start")
    w.signal(signal.SIGTERM)
    assert w.proc.wait(20) == 0
    assert no_process_left(pids)
    assert w.result("long") is None  # requeued, not lost
    status = orjson.loads((w.jobs / ".status" / "long.json").read_bytes())
    assert status["state"] == "queued" and status["attempt"] == 2
    assert ("[long] attempt 1/2 ended (WORKER_LOST: interrupted by the worker's shutdown); "
            "retrying in 1.0 s once the worker runs again (it is draining)") in w.log()


def test_a_second_supervisor_on_the_same_spool_exits_with_a_clear_message(worker: Worker) -> None:
    proc = subprocess.run([sys.executable, "-m", "worker", "supervise", *worker.args()],
                          capture_output=True, text=True, env=worker.env, timeout=60)
    assert proc.returncode == 1
    assert f"another supervisor (pid {worker.proc.pid}) already serves the spool" in proc.stderr


def test_retryable_failures_are_retried_with_backoff_until_success(make_worker) -> None:
    w = make_worker().start()
    w.drop(job("flaky", "test.retry", {"succeed_on": 3}, max_attempts=3))
    res = w.wait_result("flaky", timeout=30)
    assert res["status"] == "completed"
    assert res["execution_summary"]["attempt"] == 3
    assert [line.split()[0] for line in w.runs("flaky")] == ["1", "2", "3"]
    assert "retrying in 1.0 s" in w.log() and "retrying in 2.0 s" in w.log()


def test_a_permanent_handler_error_is_not_retried(worker: Worker) -> None:
    worker.drop(job("doomed", "test.raise", {"permanent": True, "message": "bad image"},
                    max_attempts=3))
    res = worker.wait_result("doomed")
    assert res["error"]["code"] == "EXECUTION_ERROR" and res["error"]["message"] == "bad image"
    assert len(worker.runs("doomed")) == 1


def test_higher_priority_runs_first(make_worker) -> None:
    w = make_worker("--max-concurrent", "1").start()
    w.drop(job("blocker", "test.sleep", {"seconds": 0.5}))
    _running(w, 1)
    for i, prio in enumerate([2, 9, 5, 1, 7]):
        w.drop(job(f"p{prio}-{i}", "test.ledger", {}, priority=prio))
    wait_until(lambda: "queued: test.ledger, priority 7" in w.log(), [w.base], 10)
    w.wait_results(6)
    order = sorted(
        (w.result(j)["execution_summary"]["started_at"], j)
        for j in ("p2-0", "p9-1", "p5-2", "p1-3", "p7-4")
    )
    assert [j for _, j in order] == ["p9-1", "p7-4", "p5-2", "p2-0", "p1-3"]


def test_idempotency_key_replays_the_first_result_even_after_restart(make_worker) -> None:
    w = make_worker().start()
    w.drop(job("first", "test.ledger", {}, idempotency_key="k-1"))
    assert w.wait_result("first")["status"] == "completed"
    assert w.stop() == 0
    w.start()
    w.drop(job("second", "test.ledger", {}, idempotency_key="k-1"))
    res = w.wait_result("second")
    assert res["status"] == "completed"
    assert res["idempotent_replay"] == {"job_id": "first"}
    assert res["data"] == w.result("first")["data"]
    assert w.runs("second") == []  # never executed
    assert "first used by job first for a different" not in w.log()  # the same job again
    w.drop(job("third", "test.ledger", {"other": 1}, idempotency_key="k-1"))
    assert w.wait_result("third")["idempotent_replay"] == {"job_id": "first"}
    assert ("[third] idempotency key 'k-1' was first used by job first for a different "
            "payload;") in w.log()


def test_a_job_waits_for_a_running_job_with_the_same_key(make_worker) -> None:
    w = make_worker().start()
    w.drop(job("holder", "test.sleep", {"seconds": 0.5}, idempotency_key="k-2"))
    _running(w, 1)
    w.drop(job("follower", "test.ledger", {}, idempotency_key="k-2"))
    res = w.wait_result("follower")
    assert res["idempotent_replay"] == {"job_id": "holder"}
    assert w.runs("follower") == []
    assert ("[follower] idempotency key 'k-2' was first used by job holder for a different "
            "operation and payload; that job's result is replayed all the same") in w.log()


def test_a_job_waiting_for_a_key_fails_at_its_deadline_while_the_holder_runs(make_worker) -> None:
    w = make_worker("--shutdown-timeout", "1").start()
    w.drop(job("long-holder", "test.sleep", {"seconds": 60}, idempotency_key="k-4"))
    _running(w, 1)
    due = datetime.now(UTC) + timedelta(seconds=2)
    w.drop(job("impatient", "test.ledger", {}, idempotency_key="k-4",
               deadline=due.isoformat().replace("+00:00", "Z")))
    res = w.wait_result("impatient", timeout=20)
    assert res["error"]["code"] == "DEADLINE_EXCEEDED", res["error"]
    assert "k-4" in res["error"]["message"] and "long-holder" in res["error"]["message"]
    assert w.result("long-holder") is None  # it still runs: nobody waited for its end
    assert w.runs("impatient") == []


def test_a_deadline_reached_while_running_is_deadline_exceeded_not_a_timeout(
        worker: Worker) -> None:
    """The job's timeout (an hour) is not what stopped it: its execution.deadline is."""
    due = datetime.now(UTC) + timedelta(seconds=4)  # room for a slow start on a busy machine
    worker.drop(job("due-soon", "test.sleep", {"seconds": 30},
                    deadline=due.isoformat().replace("+00:00", "Z")))
    res = worker.wait_result("due-soon", timeout=30)
    assert res["status"] == "failed" and res["error"]["code"] == "DEADLINE_EXCEEDED", res["error"]
    ran = re.fullmatch(r"its execution\.deadline passed after (\d+) s of running",
                       res["error"]["message"])
    assert ran and int(ran[1]) <= 4, res["error"]["message"]  # started after `due` was set
    assert "[due-soon] its deadline passed after" in worker.log()
    worker.drop(job("short", "test.sleep", {"seconds": 30}, timeout_seconds=1,
                    deadline=(due + timedelta(hours=1)).isoformat().replace("+00:00", "Z")))
    assert worker.wait_result("short", timeout=20)["error"]["code"] == "TIMEOUT"


def test_a_failed_key_may_run_again(worker: Worker) -> None:
    worker.drop(job("fails", "test.raise", {"permanent": True}, idempotency_key="k-3"))
    assert worker.wait_result("fails")["status"] == "failed"
    worker.drop(job("runs", "test.ledger", {}, idempotency_key="k-3"))
    res = worker.wait_result("runs")
    assert res["status"] == "completed" and "idempotent_replay" not in res


def test_a_status_file_naming_another_job_is_not_believed_at_recovery(make_worker) -> None:
    """Status files are not fsync'd: after a power cut one may hold another job's document."""
    w = make_worker("--max-concurrent", "1")
    for d in (w.jobs / ".active", w.jobs / ".status"):
        d.mkdir(parents=True)
    (w.jobs / ".active" / "00000000000000000001-000000-lost.json").write_bytes(
        orjson.dumps(job("lost", max_attempts=2)))
    (w.jobs / ".status" / "lost.json").write_bytes(orjson.dumps(
        {"job_id": "someone-else", "state": "running", "attempt": 2}))
    w.start()
    res = w.wait_result("lost")
    assert res["status"] == "completed"  # not failed as WORKER_LOST after "attempt 2 of 2"
    assert res["execution_summary"]["attempt"] == 1


def test_no_more_jobs_run_than_max_concurrent_even_when_many_start_in_one_pass(make_worker) -> None:
    """Five jobs wait at start-up, so one loop pass dispatches what it may; each asks the
    forker for its child before any pid is read, and those still count against the slots."""
    w = make_worker("--max-concurrent", "2", "--no-spares")
    for n in range(5):
        w.drop(job(f"slot-{n}", "test.sleep", {"seconds": 30}))
    w.start()

    def states() -> list[str] | None:
        rows = [ln.split() for ln in w.cli("status").stdout.splitlines() if ln.startswith("slot-")]
        found = sorted(r[1] for r in rows if len(r) > 1)
        return found if found.count("running") == 2 and found.count("queued") == 3 else None

    wait_until(states, [w.jobs / ".status"], 20, "two running, three queued")
    assert len(re.findall(r"\[slot-\d\] running: pid", w.log())) == 2
    # each names itself once boxed, which no event marks
    wait_until(lambda: len([k for k in w.children() if k.name() == "gkw-job"]) == 2, [], 10,
               "two job processes")


def test_start_up_objects_are_exempt_from_garbage_collection_before_any_job(make_worker) -> None:
    """A full collection walking the start-up heap stalled the loop for 19 ms mid-job."""
    w = make_worker("--log-level", "debug").start()
    w.drop(job("after-freeze"))
    assert w.wait_result("after-freeze")["status"] == "completed"
    log = w.log()
    found = re.search(r"start-up: (\d+) objects exempt from garbage collection", log)
    assert found, log
    assert int(found.group(1)) > 10_000  # modules, settings, registry: tens of thousands
    assert log.index(found.group(0)) < log.index("[after-freeze]")


def test_observability_is_copied_into_each_result_a_rejected_jobs_too(worker: Worker) -> None:
    trace = {"trace_id": "t-1", "span_id": "s-1", "parent_span_id": None, "correlation_id": "c-1"}
    worker.drop(job("traced") | {"observability": trace})
    worker.drop(job("traced-bad", timeout_seconds=0) | {"observability": trace})
    worker.drop(job("badly-traced", timeout_seconds=0) | {"observability": {"trace_id": 5}})
    assert worker.wait_result("traced")["observability"] == trace
    rejected = worker.wait_result("traced-bad")
    assert rejected["error"]["code"] == "VALIDATION_ERROR" and rejected["observability"] == trace
    assert worker.wait_result("badly-traced")["observability"] is None  # not valid by itself

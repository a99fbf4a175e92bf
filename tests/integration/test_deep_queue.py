"""A queue deeper than `queue_window` waits in the backlog and still behaves as one queue."""

from __future__ import annotations

import re
import signal

from conftest import job, wait_until


def test_a_deep_queue_runs_by_priority_then_arrival_through_the_backlog(make_worker) -> None:
    w = make_worker("--max-concurrent", "1", "--no-spares",
                    env={"GUESTKIT_WORKER_QUEUE_WINDOW": "2"})
    gate = job("gate", "test.probe", {"actions": [], "then_sleep": True}, priority=10)
    queued = [("a1", 5), ("a2", 5), ("b1", 9), ("a3", 5), ("c1", 1), ("b2", 9), ("a4", 5)]
    w.drop(gate, name="00-gate.json")
    for i, (job_id, priority) in enumerate(queued, start=1):
        w.drop(job(job_id, priority=priority), name=f"{i:02d}-{job_id}.json")
    w.drop(job("a3", priority=5), name="99-a3-again.json")  # a3 waits in the backlog by then
    (w.jobs / ".cancel").mkdir(parents=True, exist_ok=True)
    (w.jobs / ".cancel" / "a2").touch()  # so does a2
    w.start()
    assert w.wait_result("a2")["status"] == "cancelled"
    wait_until(lambda: "duplicate" in w.log(), [w.base], 20, "the duplicate to be rejected")
    assert (w.jobs / "rejected" / "99-a3-again.json").exists()

    w.signal(signal.SIGUSR1)
    dump = wait_until(lambda: re.search(r"(\d+) queued \((\d+) of them in the backlog\)", w.log()),
                      [w.base], 20, "the status dump")
    # a1 came second, inside the window; b1 a3 c1 b2 a4 came when it was full
    assert (int(dump.group(1)), int(dump.group(2))) == (6, 5)

    w.cli("cancel", "gate")
    for job_id, _ in queued:
        w.wait_result(job_id)
    started = re.findall(r"\[([a-z0-9]+)\] running:", w.log())
    assert started == ["gate", "b1", "b2", "a1", "a3", "a4", "c1"]
    assert w.result("a3")["status"] == "completed"  # the first a3 ran once

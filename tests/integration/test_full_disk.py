"""A full disk under the spool stops nothing for good: the supervisor stays up, holds what it
cannot write, takes and starts no job meanwhile, and goes on where it was once space returns.

The spool is a small tmpfs filled to the last page by a ballast file (mounting it needs root).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from conftest import Disk, Worker, job, scratch_dir, small_disk, stop_workers, wait_until
from redis_fixtures import (
    PREFIX,
    RedisServer,
    poll_until,
    redis_server_fixture,  # noqa: F401  (the redis_server fixture)
    xadd_jobs,
)

from worker import metrics

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")]


@pytest.fixture
def full_disk() -> Iterator[tuple[Worker, Disk]]:
    """A worker whose whole spool is on a 16 MiB tmpfs; its log is kept off that disk."""
    logs = scratch_dir()
    with small_disk(scratch_dir()) as disk:
        w = Worker(disk.mount, ["--max-concurrent", "2", "--no-spares"], None)
        w.log_path = logs / "worker.log"
        try:
            yield w, disk
        finally:
            stop_workers([w], disk.mount)
            shutil.rmtree(logs, ignore_errors=True)


def _staged(w: Worker, doc: dict[str, object] | bytes, name: str) -> Path:
    """A job file written on the spool's disk while there is room, to be moved in later."""
    path = w.base / f".staged-{name}"
    path.write_bytes(doc if isinstance(doc, bytes) else orjson.dumps(doc))
    return path


def _logged(w: Worker, text: str, what: str) -> None:
    """Wait for `text` in the log; the supervisor must still run then."""
    assert w.proc is not None
    wait_until(lambda: text in w.log() or w.proc.poll() is not None, [w.log_path.parent], 30,
               what)
    assert w.proc.poll() is None, f"the supervisor died:\n{w.log()}"


def _held(w: Worker, disk: Disk, job_id: str, drop: bool = True) -> None:
    """Drop a 2 s sleep job `job_id` (unless it comes another way) and once it runs, fill the
    disk; return when its result is held."""
    if drop:
        w.drop(job(job_id, "test.sleep", {"seconds": 2}))
    _logged(w, f"[{job_id}] running", f"{job_id} to run")
    disk.fill()
    _logged(w, f"[{job_id}] completed (its result waits for space)", f"{job_id}'s end without room")


def _dumped(w: Worker) -> str:
    """The supervisor's next SIGUSR1 status line (each is a full loop pass after the last)."""
    before = w.log().count("status: ")
    w.signal(signal.SIGUSR1)
    wait_until(lambda: w.log().count("status: ") > before, [w.log_path.parent], 30,
               "the status dump")
    return [line for line in w.log().splitlines() if "status: " in line][-1]


def test_a_result_waits_for_space_and_no_job_starts_meanwhile(full_disk: tuple[Worker, Disk]
                                                                ) -> None:
    w, disk = full_disk
    w.start("--metrics-addr", "127.0.0.1:0")
    port = w.metrics_port()
    assert metrics.fetch("127.0.0.1", port, "/readyz")[0] == 200
    later = _staged(w, job("later"), "later.json")
    _held(w, disk, "nap")
    assert "no space left on the spool's disk while" in w.log()
    os.rename(later, w.jobs / "later.json")
    _dumped(w)
    held = _dumped(w)  # the pass that saw later.json arrive has ended
    assert "no space on the spool's disk for" in held and "1 result(s) held" in held
    assert w.proc is not None and w.proc.poll() is None
    assert w.result("nap") is None
    assert [n for n in os.listdir(w.jobs / ".active") if n.endswith("-nap.json")]
    assert (w.jobs / "later.json").exists()  # not taken while there is no space
    status, body = metrics.fetch("127.0.0.1", port, "/readyz")
    assert status == 503 and b"no space left on the spool's disk" in body, body

    disk.free()
    nap = w.wait_result("nap")
    assert nap["status"] == "completed" and nap["execution_summary"]["attempt"] == 1
    assert w.wait_result("later")["status"] == "completed"
    assert "space again after" in w.log() and "1 held result(s) written" in w.log()
    wait_until(lambda: (w.jobs / "done" / "nap.json").exists(), [w.jobs / "done"], 10,
               "nap archived")
    assert metrics.fetch("127.0.0.1", port, "/readyz")[0] == 200


def test_jobs_found_on_a_full_disk_are_taken_and_started_once_there_is_room(
        full_disk: tuple[Worker, Disk]) -> None:
    w, disk = full_disk
    w.start()
    good = _staged(w, job("good"), "good.json")
    bad = _staged(w, b'{"job_id": "bad", "version": "1.0"}', "bad.json")
    disk.fill()
    os.rename(good, w.jobs / "good.json")  # claimed (a rename), but its start has no room
    _logged(w, "no space left on the spool's disk while starting job good", "good held back")
    assert "0 running, 1 queued" in _dumped(w)
    os.truncate(disk.ballast, os.stat(disk.ballast).st_size - (32 << 10))  # under the probe's
    _dumped(w)
    assert "0 running, 1 queued" in _dumped(w)  # room to start, but space is still short
    os.rename(bad, w.jobs / "bad.json")  # left in the inbox while there is no room
    _dumped(w)
    _dumped(w)
    assert (w.jobs / "bad.json").exists()
    assert "could not take bad.json" not in w.log()  # not even tried while space is short
    assert w.result("good") is None and w.result("bad") is None
    assert not os.listdir(w.jobs / "rejected")

    disk.free()
    good_result = w.wait_result("good")
    assert good_result["status"] == "completed"
    assert good_result["execution_summary"]["attempt"] == 1
    bad_result = w.wait_result("bad")
    assert bad_result["error"]["code"] == "VALIDATION_ERROR"
    record = orjson.loads((w.jobs / "rejected" / "bad.json.error.json").read_bytes())
    assert record["job_id"] == "bad" and "kind" in record["message"]
    assert w.proc is not None and w.proc.poll() is None


@pytest.mark.parametrize("bad", ["invalid", "oversized"])
def test_a_bad_file_that_finds_no_room_for_its_record_stays_in_the_inbox(
        full_disk: tuple[Worker, Disk], bad: str) -> None:
    w, disk = full_disk
    w.start()
    doc = (b'{"job_id": "worse", "version": "1.0"}' if bad == "invalid"
           else orjson.dumps(job("worse", data={"pad": "x" * (1 << 20)})))
    staged = _staged(w, doc, "worse.json")
    disk.fill()
    os.rename(staged, w.jobs / "worse.json")
    _logged(w, "while taking job file worse.json", "the rejection that found no room")
    _dumped(w)
    assert (w.jobs / "worse.json").exists()  # back in the inbox, not claimed nor rejected
    assert w.log().count("could not take worse.json") == 1  # and not taken again meanwhile
    assert not os.listdir(w.jobs / ".active") and not os.listdir(w.jobs / "rejected")
    assert not [n for n in os.listdir(w.results) if not n.startswith(".next-result")]

    disk.free()
    record = w.jobs / "rejected" / "worse.json.error.json"
    wait_until(record.exists, [w.jobs / "rejected"], 30, "the rejection")
    if bad == "invalid":
        assert w.wait_result("worse")["error"]["code"] == "VALIDATION_ERROR"
    else:
        assert "over the limit" in orjson.loads(record.read_bytes())["message"]
    assert not (w.jobs / "worse.json").exists() and not os.listdir(w.jobs / ".active")


def test_an_id_whose_result_waits_for_space_is_not_taken_by_another_job(
        full_disk: tuple[Worker, Disk]) -> None:
    w, disk = full_disk
    first = _staged(w, job("twice", "no.such.op"), "a.json")  # ends at once: unsupported
    second = _staged(w, job("twice", "test.ledger"), "b.json")
    w.jobs.mkdir()
    disk.fill()
    os.rename(first, w.jobs / "a.json")
    os.rename(second, w.jobs / "b.json")
    w.start()  # the start-up scan stops at the first: b.json waits for room
    _logged(w, "[twice] failed (UNSUPPORTED_OPERATION", "the first's end")

    disk.free()
    assert w.wait_result("twice")["error"]["code"] == "UNSUPPORTED_OPERATION"
    record = w.jobs / "rejected" / "b.json.error.json"
    wait_until(record.exists, [w.jobs / "rejected"], 30, "the second's rejection")
    assert orjson.loads(record.read_bytes())["duplicate_of"] == "twice"
    assert w.runs("twice") == []


def test_a_claimed_job_whose_id_waits_for_space_is_not_recovered_as_another(
        full_disk: tuple[Worker, Disk]) -> None:
    """Recovery admits claimed files without a pause for space: a held result's id counts."""
    w, disk = full_disk
    first = _staged(w, job("twice", "no.such.op"), "a.json")  # ends at once: unsupported
    second = _staged(w, job("twice", "test.ledger"), "b.json")
    (w.jobs / ".active").mkdir(parents=True)
    disk.fill()
    os.rename(first, w.jobs / ".active" / "00000000000000000001-000000-a.json")
    os.rename(second, w.jobs / ".active" / "00000000000000000002-000000-b.json")
    w.start()
    _logged(w, "[twice] failed (UNSUPPORTED_OPERATION", "the first's end")
    disk.free()
    assert w.wait_result("twice")["error"]["code"] == "UNSUPPORTED_OPERATION"
    _dumped(w)
    _dumped(w)
    assert w.stop() == 0
    assert w.runs("twice") == []


def test_a_drain_ends_at_its_deadline_when_space_never_returns(
        full_disk: tuple[Worker, Disk]) -> None:
    w, disk = full_disk
    w.start("--shutdown-timeout", "2")
    _held(w, disk, "stuck")
    asked = time.monotonic()
    w.signal(signal.SIGTERM)
    assert w.proc is not None and w.proc.wait(30) == 0
    assert time.monotonic() - asked >= 2.0 - 0.1  # it gave the result its 2 s to find room
    assert "stopping with 1 ended job(s) not archived for lack of space" in w.log()
    assert w.result("stuck") is None


def test_a_drain_gives_held_results_until_its_deadline_to_find_room(
        full_disk: tuple[Worker, Disk]) -> None:
    w, disk = full_disk
    w.start("--shutdown-timeout", "120")
    _held(w, disk, "last")
    w.signal(signal.SIGTERM)
    _logged(w, "SIGTERM: draining", "the drain")
    assert "1 result(s) held" in _dumped(w)  # nothing runs, and it still serves
    disk.free()
    assert w.proc is not None and w.proc.wait(60) == 0  # no second SIGTERM: that stops at once
    assert "space again after" in w.log()
    assert w.result("last")["status"] == "completed"  # type: ignore[index]
    assert (w.jobs / "done" / "last.json").exists()


def test_with_redis_a_held_result_is_shared_only_once_it_is_written_here(
        redis_server: RedisServer, full_disk: tuple[Worker, Disk]) -> None:
    """Shared first, a result held at a stop would contradict what the next start decides."""
    w, disk = full_disk
    w.extra_args += ["--transport", "redis", "--redis-url", redis_server.url, "--worker-id", "rd"]
    w.start()
    r = redis_server.client()
    xadd_jobs(r, [job("shared", "test.sleep", {"seconds": 2})])
    _held(w, disk, "shared", drop=False)
    assert r.get(f"{PREFIX}:result:shared") is None

    disk.free()
    local = w.wait_result("shared")
    shared = poll_until(lambda: r.get(f"{PREFIX}:result:shared"), 30, "the shared result")
    assert local["status"] == orjson.loads(shared)["status"] == "completed"

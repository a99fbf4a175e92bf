"""Untrusted job files: each is moved aside with a clear error while the daemon goes on."""

from __future__ import annotations

import os

import orjson
import pytest
from conftest import Worker, job, select_sleep, wait_until


def _rejected(w: Worker, name: str) -> dict:
    path = w.jobs / "rejected" / f"{name}.error.json"
    return wait_until(lambda: path.exists() and orjson.loads(path.read_bytes()),
                      [w.jobs / "rejected"], 20, f"{name} to be rejected")


def _alive(w: Worker, tag: str) -> None:
    w.drop(job(f"ok-{tag}"))
    assert w.wait_result(f"ok-{tag}")["status"] == "completed"


CASES = {
    "invalid-json": (b'{"version": "1.0", "job_id": ', "not valid JSON"),
    "invalid-utf8": (b'{"version": "1.0", "job_id": "u\xff\xfe"}', "not valid UTF-8"),
    "not-an-object": (b'["system.echo"]', "expected a JSON object, got list"),
    "zero-timeout": (orjson.dumps(job("zero", timeout_seconds=0)),
                     "field 'execution.timeout_seconds': expected greater than or equal to 1"),
    "path-trick": (orjson.dumps(job("../../etc/x")),
                   "field 'job_id': expected 1-128 characters of A-Z a-z 0-9 . _ -"),
    "bad-version": (orjson.dumps({**job("v2"), "version": "2.0"}),
                    "field 'version': expected '1.0', got '2.0'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_documents_are_moved_aside_with_the_reason(worker: Worker, case: str) -> None:
    data, expected = CASES[case]
    worker.drop(data, name=f"{case}.json")
    reason = _rejected(worker, f"{case}.json")
    assert expected in reason["message"], reason
    assert (worker.jobs / "rejected" / f"{case}.json").read_bytes() == data
    _alive(worker, case)


def test_a_safe_job_id_gets_a_failed_result_too(worker: Worker) -> None:
    worker.drop(job("zero-t", timeout_seconds=0))
    res = worker.wait_result("zero-t")
    assert res["status"] == "failed" and res["error"]["code"] == "VALIDATION_ERROR"
    assert "execution.timeout_seconds" in res["error"]["message"]
    assert "job 'zero-t'" in res["error"]["message"]


def test_a_job_id_with_a_final_newline_is_not_used_in_a_file_name(worker: Worker) -> None:
    """A pattern's `$` matches before a final newline too: such an id gets no result file."""
    worker.drop(orjson.dumps(job("nl\n")), name="nl.json")
    reason = _rejected(worker, "nl.json")
    assert reason["job_id"] is None, reason
    assert reason["message"].startswith("job file nl.json: field 'job_id': expected"), reason
    _alive(worker, "nl")
    assert not [name for name in os.listdir(worker.results) if "\n" in name]


def test_unsupported_version_has_its_own_code(worker: Worker) -> None:
    worker.drop({**job("v9"), "version": "9.0"})
    assert worker.wait_result("v9")["error"]["code"] == "UNSUPPORTED_VERSION"


def test_a_10_mib_file_is_rejected_unread(worker: Worker) -> None:
    big = orjson.dumps(job("big", data={"pad": "x" * (10 << 20)}))
    worker.drop(big, name="big.json")
    reason = _rejected(worker, "big.json")
    assert "over the limit of 1048576 bytes" in reason["message"]
    assert worker.result("big") is None  # its job_id was never read
    _alive(worker, "big")


def test_a_symlink_to_etc_shadow_is_moved_aside_not_followed(worker: Worker) -> None:
    os.symlink("/etc/shadow", worker.jobs / "shadow.json")
    reason = _rejected(worker, "shadow.json")
    assert "symbolic link" in reason["message"]
    assert (worker.jobs / "rejected" / "shadow.json").is_symlink()
    assert os.stat("/etc/shadow")  # untouched
    _alive(worker, "symlink")


def test_a_fifo_is_moved_aside_without_blocking(worker: Worker) -> None:
    os.mkfifo(worker.base / "pipe")
    os.rename(worker.base / "pipe", worker.jobs / "pipe.json")
    reason = _rejected(worker, "pipe.json")
    assert "is a FIFO, not a regular file" in reason["message"]
    _alive(worker, "fifo")


def test_a_directory_named_like_a_job_is_moved_aside(worker: Worker) -> None:
    (worker.jobs / "x.json").mkdir()
    reason = _rejected(worker, "x.json")
    assert "is a directory, not a regular file" in reason["message"]
    _alive(worker, "dir")


def test_an_unknown_operation_fails_with_unsupported_operation(worker: Worker) -> None:
    worker.drop(job("unknown-op", "vm.teleport"))
    res = worker.wait_result("unknown-op")
    assert res["error"]["code"] == "UNSUPPORTED_OPERATION"
    assert "no handler for operation 'vm.teleport'" in res["error"]["message"]


def test_a_payload_failing_its_schema_is_rejected_before_fork(worker: Worker) -> None:
    worker.drop(job("schema-bad", "test.schema", {"count": "many"}))
    res = worker.wait_result("schema-bad")
    assert res["error"]["code"] == "VALIDATION_ERROR"
    assert "field 'payload.data.count': expected a valid integer" in res["error"]["message"]
    assert res["execution_summary"]["started_at"] is None  # never forked
    assert not (worker.work / "schema-bad").exists()
    worker.drop(job("schema-ok", "test.schema", {"count": 21}))
    assert worker.wait_result("schema-ok")["data"] == {"doubled": 42}


def test_a_duplicate_job_id_is_moved_aside_and_the_first_result_kept(worker: Worker) -> None:
    worker.drop(job("dup", data={"v": 1}))
    first = worker.wait_result("dup")
    worker.drop(job("dup", data={"v": 2}), name="dup-again.json")
    reason = _rejected(worker, "dup-again.json")
    assert "field 'job_id': duplicate" in reason["message"]
    assert worker.result("dup") == first


def test_a_file_written_slowly_in_chunks_is_not_read_before_it_is_complete(worker: Worker) -> None:
    data = orjson.dumps(job("slow-writer", data={"text": "y" * 4000}))
    with open(worker.jobs / "slow-writer.json", "wb") as f:
        for i in range(0, len(data), 1000):
            f.write(data[i : i + 1000])
            f.flush()
            select_sleep(0.2)  # a slow writer: the worker must not read it yet
        assert worker.result("slow-writer") is None
        assert not list((worker.jobs / "rejected").iterdir())
    res = worker.wait_result("slow-writer")
    assert res["status"] == "completed" and res["data"]["echo"]["text"] == "y" * 4000


def test_a_file_still_open_at_startup_is_taken_only_after_its_writer_closes(make_worker) -> None:
    w = make_worker()
    w.jobs.mkdir(parents=True)
    data = orjson.dumps(job("early"))
    with open(w.jobs / "early.json", "wb") as f:
        f.write(data[:10])
        f.flush()
        w.start()
        assert w.result("early") is None
        assert not list((w.jobs / "rejected").iterdir())
        assert (w.jobs / "early.json").exists()  # not claimed while its writer holds it
        f.write(data[10:])
    assert w.wait_result("early")["status"] == "completed"


def test_inotify_overflow_is_answered_by_a_rescan(make_worker) -> None:
    w = make_worker().start()
    w.signal(19)  # SIGSTOP: the worker cannot read events while 17,000 arrive
    try:
        for i in range(17000):
            (w.jobs / f"noise-{i}.txt").write_bytes(b"")
        for i in range(3):
            w.drop(job(f"after-overflow-{i}"))
    finally:
        w.signal(18)  # SIGCONT
    for i in range(3):
        assert w.wait_result(f"after-overflow-{i}")["status"] == "completed"
    assert "inotify queue overflowed; rescanning the inbox" in w.log()


def test_startup_scan_takes_jobs_dropped_while_stopped(make_worker) -> None:
    w = make_worker()
    for i in range(5):
        w.drop(job(f"offline-{i}"))
    w.start()
    for i in range(5):
        assert w.wait_result(f"offline-{i}")["status"] == "completed"

"""Untrusted job files: each is moved aside with a clear error while the daemon goes on."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

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
    "latin-1": (b'{"version": "1.0", "job_id": "caf\xe9"}',
                "not valid UTF-8: byte 0xe9 at offset 33 is not part of a UTF-8 character"),
    "not-an-object": (b'["system.echo"]', "expected a JSON object, got list"),
    "zero-timeout": (orjson.dumps(job("zero", timeout_seconds=0)),
                     "field 'execution.timeout_seconds': expected greater than or equal to 1"),
    "path-trick": (orjson.dumps(job("../../etc/x")),
                   "field 'job_id': expected 1-128 characters of A-Z a-z 0-9 . _ -"),
    "bad-version": (orjson.dumps({**job("v2"), "version": "2.0"}),
                    "field 'version': expected '1.0', got '2.0'"),
    "utf-16": ('{"version": "1.0"}'.encode("utf-16"),
               "not valid UTF-8: it is UTF-16 (it starts with that byte order mark)"),
    "long-id": (orjson.dumps(job("x" * 300)), "..." + " (300 characters)"),
    "version-word": (orjson.dumps(job("vw") | {"constraints": {"minimum_worker_version": "latest"}}),
                     "field 'constraints.minimum_worker_version': expected a version such as "
                     "'0.5' or '1.2.3', got 'latest'"),
    # orjson keeps the last of a repeated key; another reader of the same file, the first
    "two-ids": (b'{"version": "1.0", "job_id": "first", "job_id": "second"}',
                "job file two-ids.json: field 'job_id': expected each key once in its object, "
                "got it twice (which one counts is not defined)"),
    "two-values": (orjson.dumps(job("tv", data={"a": [{"b": 1}]})).replace(b'"b":1', b'"b":1,"b":2'),
                   "job 'tv': field 'payload.data.a.0.b': expected each key once"),
    "long-key": (orjson.dumps(job("lk", data={"k" * 100: 1})).replace(
        b'"' + b"k" * 100 + b'":1', b'"' + b"k" * 100 + b'":1,"' + b"k" * 100 + b'":2'),
        "job 'lk': field 'payload.data." + "k" * 44 + "...': expected each key once"),
    # a number would be read as seconds or as milliseconds, by its size
    "numeric-deadline": (orjson.dumps(job("n-deadline", deadline=99999999999)),
                         "field 'execution.deadline': expected an RFC 3339 timestamp such as "
                         "'2026-01-01T00:00:00Z', got 99999999999"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_documents_are_moved_aside_with_the_reason(worker: Worker, case: str) -> None:
    data, expected = CASES[case]
    worker.drop(data, name=f"{case}.json")
    reason = _rejected(worker, f"{case}.json")
    assert expected in reason["message"], reason
    assert (worker.jobs / "rejected" / f"{case}.json").read_bytes() == data
    _alive(worker, case)


def test_a_utf8_byte_order_mark_is_skipped(worker: Worker) -> None:
    """Some editors start UTF-8 files with one; JSON allows a reader to skip it."""
    worker.drop(b"\xef\xbb\xbf" + orjson.dumps(job("with-bom", data={"message": "caf\u00e9"})),
                "with-bom.json")
    res = worker.wait_result("with-bom")
    assert res["status"] == "completed" and res["data"]["echo"] == {"message": "caf\u00e9"}


@pytest.mark.parametrize(("data", "expected"), [
    ("ten", "field 'payload.data': expected an object such as {\"seconds\": 60}, got 'ten'"),
    ({}, "field 'payload.data.seconds': required but missing"),
])
def test_a_sleep_payload_of_the_wrong_shape_says_which(worker: Worker, data: object,
                                                       expected: str) -> None:
    worker.drop(job("bad-nap", "system.sleep", data))
    res = worker.wait_result("bad-nap")
    assert res["error"]["message"] == f"job 'bad-nap': {expected}", res["error"]


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


#: Writes argv[2] to argv[1] in two parts; between them, says "ready" and waits for a line.
_SLOW_WRITER = """
import sys
data = sys.argv[2].encode()
with open(sys.argv[1], "wb", buffering=0) as f:
    f.write(data[:20])
    print("ready", flush=True)
    sys.stdin.readline()
    f.write(data[20:])
"""
#: Any user may run it (a venv's interpreter may sit in a directory only root can enter).
_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop CAP_LEASE and switch users")
def test_without_cap_lease_another_users_file_waits_for_its_close(make_worker) -> None:
    """A read lease on a file one does not own needs CAP_LEASE. Without it the worker cannot
    tell an open writer: a file it saw created waits for its close event, however long its
    writer pauses; one found by the start-up scan, or linked in (no close event can come),
    is taken once it has stood still for a second."""
    w = make_worker()
    w.wrapper = ["setpriv", "--bounding-set=-lease", "--"]
    w.jobs.mkdir(parents=True)
    w.jobs.chmod(0o1777)  # another user's drop box
    write = "import sys; open(sys.argv[1], 'w').write(sys.argv[2])"
    subprocess.run([_PYTHON, "-c", write, str(w.jobs / "before-start.json"),
                    orjson.dumps(job("before-start")).decode()], user=65534, check=True)
    w.start()
    assert w.wait_result("before-start")["status"] == "completed"
    data = orjson.dumps(job("others", data={"text": "z" * 100})).decode()
    writer = subprocess.Popen([_PYTHON, "-c", _SLOW_WRITER, str(w.jobs / "others.json"), data],
                              user=65534, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "ready\n"
        _alive(w, "during-write")  # the worker has seen the file's creation
        select_sleep(2.5)  # the writer pauses: two looks at a file that stands still
        assert (w.jobs / "others.json").exists() and w.result("others") is None
        assert not list((w.jobs / "rejected").iterdir())
    finally:
        writer.communicate("go on\n", timeout=30)
    res = w.wait_result("others")
    assert res["status"] == "completed" and res["data"]["echo"]["text"] == "z" * 100
    link = "import os, sys; open(sys.argv[1], 'w').write(sys.argv[2]); os.link(sys.argv[1], sys.argv[3])"
    subprocess.run([_PYTHON, "-c", link, str(w.jobs / "linked.part"),
                    orjson.dumps(job("linked-by-other")).decode(),
                    str(w.jobs / "linked-by-other.json")], user=65534, check=True)
    assert w.wait_result("linked-by-other")["status"] == "completed"


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


def _nested(depth: int) -> object:
    value: object = "bottom"
    for _ in range(depth):
        value = [value]
    return value


def test_a_payload_nested_too_deep_is_rejected_and_the_deepest_allowed_runs(worker: Worker) -> None:
    """Levels count from the document itself: it and `payload` take 2 of the 127."""
    worker.drop(job("too-deep", data=_nested(130)))
    res = worker.wait_result("too-deep")
    assert res["error"]["code"] == "VALIDATION_ERROR", res["error"]
    assert res["error"]["message"] == (
        "job 'too-deep': field 'payload.data.0': expected arrays and objects nested at most "
        "127 levels deep (the document counts as 1), got 132")
    worker.drop(job("deep-enough", data=_nested(125)))
    res = worker.wait_result("deep-enough")
    assert res["status"] == "completed" and res["data"]["echo"] == _nested(125)


def test_a_hidden_or_non_json_name_is_left_alone_while_running_as_at_start(make_worker) -> None:
    """One rule for the watch and the scan: a writer's hidden temporary file is not a job."""
    w = make_worker()
    w.drop(job("hidden-at-start"), ".hidden-at-start.json")
    w.start()
    w.drop(job("hidden-live"), ".hidden-live.json")
    w.drop(job("not-json"), "not-json.txt")
    w.drop(job("marker"))  # its events come after theirs
    assert w.wait_result("marker")["status"] == "completed"
    for name in (".hidden-at-start.json", ".hidden-live.json", "not-json.txt"):
        assert (w.jobs / name).is_file(), name
    assert not any(n.endswith(".error.json") for n in os.listdir(w.jobs / "rejected"))
    assert all(w.result(j) is None for j in ("hidden-at-start", "hidden-live", "not-json"))


def test_an_integer_beyond_64_bits_is_rejected_not_rounded(worker: Worker) -> None:
    """orjson reads 2**64 as the float 1.8446744073709552e19: the job would run on a number
    it was not sent. The widest integers it keeps exactly still run and come back as sent."""
    wide = orjson.dumps(job("too-wide", data={"disks": [{"size": "@"}]}))
    worker.drop(wide.replace(b'"@"', str(2**64).encode()), "too-wide.json")
    res = worker.wait_result("too-wide")
    assert res["error"]["code"] == "VALIDATION_ERROR", res["error"]
    assert res["error"]["message"] == (
        "job 'too-wide': field 'payload.data.disks.0.size': expected an integer from -2**63 "
        "to 2**64-1 (send a wider one as a string), got 18446744073709551616")
    worker.drop(job("wide-enough", data={"big": 2**64 - 1, "low": -(2**63), "s": str(2**70)}))
    res = worker.wait_result("wide-enough")
    assert res["status"] == "completed", res["error"]
    assert res["data"]["echo"] == {"big": 2**64 - 1, "low": -(2**63), "s": str(2**70)}
    _alive(worker, "too-wide")


def test_a_thousand_levels_deep_payload_does_not_stop_the_daemon(worker: Worker) -> None:
    deep = b"[" * 1000 + b"]" * 1000  # written by hand: orjson writes at most 254 levels
    worker.drop(orjson.dumps(job("very-deep", data="@")).replace(b'"@"', deep), "very-deep.json")
    assert worker.wait_result("very-deep")["error"]["code"] == "VALIDATION_ERROR"
    _alive(worker, "very-deep")


def test_a_name_or_a_message_cannot_forge_a_log_line(worker: Worker) -> None:
    """Newlines and terminal escapes from a file name or a job's own error come out as
    \\xNN: every line of the log is one the worker wrote."""
    forged = "\n2026-01-01 00:00:00 INFO [forged] completed\n"
    worker.drop(b"{not json", f"name{forged}\x1b[2J.json")
    _rejected(worker, f"name{forged}\x1b[2J.json")
    worker.drop(job("liar", "test.raise", {"permanent": True, "message": f"no{forged}\u2028"}))
    assert worker.wait_result("liar")["error"]["message"] == f"no{forged}\u2028"  # as sent
    assert "\u2028" not in worker.log()  # a line separator to some viewers
    lines = worker.log().splitlines()
    assert not [ln for ln in lines if "[forged]" in ln and not ln.count("\\x0a")], lines
    assert not [ln for ln in lines if "\x1b" in ln]
    assert any("[liar] failed (EXECUTION_ERROR: no\\x0a2026-01-01" in ln for ln in lines)


def test_a_file_name_that_is_not_utf8_is_named_with_escapes(worker: Worker) -> None:
    os.rename(_outside(worker, b"{not json"), os.fsencode(worker.jobs) + b"/bad\xffname.json")
    reason = _rejected(worker, "bad\\xffname.json")
    assert reason["file"] == "bad\\xffname.json"
    assert reason["message"].startswith("job file bad\\xffname.json: not valid JSON"), reason
    os.rename(_outside(worker, orjson.dumps(job("odd-name"))),
              os.fsencode(worker.jobs) + b"/odd\xfe.json")
    res = worker.wait_result("odd-name")
    assert res["status"] == "completed", res["error"]
    _alive(worker, "not-utf8")


def _outside(w: Worker, data: bytes) -> bytes:
    """A file written next to the spool, ready to be renamed in."""
    path = w.base / f".outside-{len(os.listdir(w.base))}"
    path.write_bytes(data)
    return os.fsencode(path)


def test_rejected_files_never_replace_one_another(worker: Worker) -> None:
    """A file named like another's record, then that other file; and a name shaped like a
    claimed one keeps its prefix."""
    worker.drop(b"first {", name="foo.json.error.json")
    _rejected(worker, "foo.json.error.json")
    worker.drop(b"second {", name="foo.json")
    rejected = worker.jobs / "rejected"
    # the record is written after the file is moved: wait for the record
    second_record = wait_until(lambda: list(rejected.glob("*-foo.json.error.json")), [rejected],
                               20, "the second rejection, under another name")[0]
    second = second_record.with_name(second_record.name.removesuffix(".error.json"))
    assert second.read_bytes() == b"second {"
    assert (rejected / "foo.json.error.json").read_bytes() == b"first {"
    record = orjson.loads(second_record.read_bytes())
    assert record["file"] == second.name and "not valid JSON" in record["message"]
    os.symlink("/etc/hostname", worker.jobs / "111-222-evil.json")
    assert _rejected(worker, "111-222-evil.json")["file"] == "111-222-evil.json"


def test_a_very_long_name_and_a_socket_each_end_clearly(worker: Worker) -> None:
    os.rename(_outside(worker, orjson.dumps(job("long-named"))), worker.jobs / ("L" * 240 + ".json"))
    assert worker.wait_result("long-named")["status"] == "completed"
    os.rename(_outside(worker, b"{"), worker.jobs / ("M" * 246 + ".json"))
    rejected = worker.jobs / "rejected"
    record = wait_until(lambda: [p for p in rejected.glob("MMM*.error.json")], [rejected], 20)
    assert "not valid JSON" in orjson.loads(record[0].read_bytes())["message"]
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(worker.base / "sock"))
        os.rename(worker.base / "sock", worker.jobs / "sock.json")
        assert "is a socket, not a regular file" in _rejected(worker, "sock.json")["message"]
    assert not [n for n in os.listdir(worker.jobs) if n.endswith(".json")]


def test_a_file_linked_in_while_its_writer_holds_it_is_taken_once_closed(worker: Worker) -> None:
    """The writer's close is seen where it opened the file, not in the inbox."""
    data = orjson.dumps(job("linked-in"))
    with open(worker.base / "elsewhere.json", "wb") as f:
        f.write(data[:20])
        f.flush()
        os.link(worker.base / "elsewhere.json", worker.jobs / "linked-in.json")
        _alive(worker, "linked-open")  # a loop pass or more with the writer still there
        assert (worker.jobs / "linked-in.json").exists()
        f.write(data[20:])
    assert worker.wait_result("linked-in")["status"] == "completed"

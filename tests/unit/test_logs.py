"""Log formats, priorities and journal fields; a real datagram socket stands in for journald."""

from __future__ import annotations

import array
import fcntl
import logging
import os
import re
import socket
import struct
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from worker import logs
from worker.errors import ConfigError

JOB = {
    "job_id": "test-job-123",
    "operation": "guestkit.inspect",
    "state": "running",
    "attempt": 2,
    "worker_id": "w-1",
}
HUMAN_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (?P<level>[A-Z]+) (?P<rest>.*)$")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root, ours = logging.getLogger(), logging.getLogger(logs.LOGGER_NAME)
    saved = (list(root.handlers), root.level, ours.level, logging.raiseExceptions)
    yield
    for handler in root.handlers:
        if handler not in saved[0]:
            root.removeHandler(handler)
            handler.close()
    root.setLevel(saved[1])
    ours.setLevel(saved[2])
    logging.raiseExceptions = saved[3]
    logs._installed = None


@pytest.fixture
def journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket bound where the journal handler will send, with credentials on."""
    path = tmp_path / "journal.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(str(path))
    sock.settimeout(5)  # bounds a broken test; datagrams are queued before the call returns
    monkeypatch.setenv(logs.JOURNAL_SOCKET_ENV, str(path))
    with sock:
        yield sock


def parse_native(data: bytes) -> dict[str, bytes]:
    """Decode journald's native protocol (both the ``K=V`` and the length-prefixed form)."""
    fields: dict[str, bytes] = {}
    pos = 0
    while pos < len(data):
        end = data.index(b"\n", pos)
        line = data[pos:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            pos = end + 1
        else:
            key = line
            (size,) = struct.unpack("<Q", data[end + 1 : end + 9])
            value = data[end + 9 : end + 9 + size]
            assert data[end + 9 + size : end + 10 + size] == b"\n"
            pos = end + 10 + size
        assert key.decode() not in fields, f"duplicate field {key!r}"
        fields[key.decode()] = value
    return fields


def receive_entry(sock: socket.socket) -> dict[str, bytes]:
    return parse_native(sock.recv(1 << 20))


def assert_nothing_waiting(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        with pytest.raises(BlockingIOError):
            sock.recv(1 << 20)
    finally:
        sock.settimeout(5)


log = logging.getLogger("guestkit.test")


class TestChoosingAFormat:
    @pytest.mark.parametrize("fmt", ["human", "json", "journal"])
    def test_explicit_formats_are_kept(self, fmt: str) -> None:
        assert logs.resolve_format(fmt) == fmt

    def test_unknown_format_names_the_setting(self) -> None:
        with pytest.raises(ConfigError, match="log_format: 'xml'"):
            logs.setup_logging("xml")

    def test_unknown_level_names_the_setting(self) -> None:
        with pytest.raises(ConfigError, match="log_level: 'loud'"):
            logs.setup_logging("human", "loud")

    def test_auto_is_journal_when_journal_stream_is_our_stderr(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        st = os.fstat(2)
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert logs.resolve_format("auto") == "journal"

    @pytest.mark.parametrize("value", ["", "garbage", "1:", ":2", "-1:-1"])
    def test_auto_is_human_without_a_usable_journal_stream(
        self, monkeypatch: pytest.MonkeyPatch, value: str
    ) -> None:
        monkeypatch.setenv("JOURNAL_STREAM", value)
        assert logs.resolve_format("auto") == "human"

    def test_auto_is_human_when_journal_stream_names_another_file(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        other = tmp_path / "elsewhere"
        other.touch()
        st = other.stat()
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert logs.resolve_format("auto") == "human"

    def test_auto_ignores_an_existing_journal_socket(
        self, monkeypatch: pytest.MonkeyPatch, journal: socket.socket
    ) -> None:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        assert logs.resolve_format("auto") == "human"


class TestHuman:
    def test_job_line_has_the_job_id_in_brackets(self, capsys: pytest.CaptureFixture[str]) -> None:
        logs.setup_logging("human")
        log.info("execution - Running operation (%d%%)", 50, extra=JOB)
        line = capsys.readouterr().err
        assert line.endswith("\n") and line.count("\n") == 1
        match = HUMAN_LINE.match(line.rstrip("\n"))
        assert match, line
        assert match["level"] == "INFO"
        assert match["rest"] == "[test-job-123] execution - Running operation (50%)"

    def test_line_without_job_has_no_brackets(self, capsys: pytest.CaptureFixture[str]) -> None:
        logs.setup_logging("human")
        log.warning("spool recovered: %d requeued", 3)
        match = HUMAN_LINE.match(capsys.readouterr().err.rstrip("\n"))
        assert match
        assert (match["level"], match["rest"]) == ("WARNING", "spool recovered: 3 requeued")

    def test_traceback_follows_the_line(self, capsys: pytest.CaptureFixture[str]) -> None:
        logs.setup_logging("human")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.exception("handler crashed", extra={"job_id": "j-9"})
        err = capsys.readouterr().err.splitlines()
        assert err[0].endswith("ERROR [j-9] handler crashed")
        assert err[1] == "Traceback (most recent call last):"
        assert err[-1] == "RuntimeError: boom"

    def test_levels_filter_our_tree_and_keep_others_at_warning(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        logs.setup_logging("human", "info")
        log.debug("hidden debug")
        log.info("shown info")
        logging.getLogger("somelib").info("hidden library info")
        logging.getLogger("somelib").warning("shown library warning")
        err = capsys.readouterr().err
        assert "shown info" in err and "shown library warning" in err
        assert "hidden" not in err
        logs.setup_logging("human", "DEBUG")
        log.debug("now shown debug")
        logging.getLogger("somelib").info("still hidden library info")
        err = capsys.readouterr().err
        assert "now shown debug" in err and "hidden" not in err

    def test_setting_up_twice_leaves_one_handler(self, capsys: pytest.CaptureFixture[str]) -> None:
        logs.setup_logging("human")
        logs.setup_logging("json")
        log.info("once")
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1
        assert orjson.loads(lines[0])["msg"] == "once"


class TestJson:
    def test_fields_and_shape(self, capsys: pytest.CaptureFixture[str]) -> None:
        logs.setup_logging("json")
        log.info("execution - Running operation (50%)", extra=JOB)
        (line,) = capsys.readouterr().err.splitlines()
        doc = orjson.loads(line)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc.pop("ts"))
        assert doc == {
            "level": "info",
            "logger": "guestkit.test",
            "msg": "execution - Running operation (50%)",
            **JOB,
        }

    def test_exception_and_odd_values(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        logs.setup_logging("json")
        try:
            empty: dict[str, int] = {}
            empty["missing"]
        except KeyError:
            log.error("lookup failed\nsecond line", exc_info=True, extra={"state": tmp_path})
        (line,) = capsys.readouterr().err.splitlines()
        doc = orjson.loads(line)
        assert doc["level"] == "error"
        assert doc["msg"] == "lookup failed\nsecond line"
        assert doc["state"] == str(tmp_path)
        assert doc["exc"].endswith("KeyError: 'missing'")
        assert "job_id" not in doc


class TestJournal:
    def test_fields_of_a_job_line(self, journal: socket.socket) -> None:
        logs.setup_logging("journal")
        log.info("execution - Running operation (50%)", extra=JOB)
        entry = receive_entry(journal)
        assert entry["MESSAGE"] == b"[test-job-123] execution - Running operation (50%)"
        assert entry["PRIORITY"] == b"6"
        assert entry["SYSLOG_IDENTIFIER"] == b"guestkit-worker"
        assert entry["GUESTKIT_JOB_ID"] == b"test-job-123"
        assert entry["GUESTKIT_OPERATION"] == b"guestkit.inspect"
        assert entry["GUESTKIT_STATE"] == b"running"
        assert entry["GUESTKIT_ATTEMPT"] == b"2"
        assert entry["GUESTKIT_WORKER_ID"] == b"w-1"
        assert entry["GUESTKIT_LOGGER"] == b"guestkit.test"
        assert entry["CODE_FILE"] == __file__.encode()
        assert entry["CODE_FUNC"] == b"test_fields_of_a_job_line"
        assert int(entry["CODE_LINE"]) > 0
        assert "JOB_ID" not in entry

    def test_sender_is_this_process(self, journal: socket.socket) -> None:
        logs.setup_logging("journal")
        log.info("hello")
        _, ancdata, _, _ = journal.recvmsg(1 << 16, socket.CMSG_SPACE(12))
        (level, kind, data) = ancdata[0]
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
        assert struct.unpack("3i", data[:12])[0] == os.getpid()

    def test_a_line_without_a_job_has_no_job_fields(self, journal: socket.socket) -> None:
        logs.setup_logging("journal")
        log.warning("disk almost full")
        entry = receive_entry(journal)
        assert entry["MESSAGE"] == b"disk almost full"
        assert not [key for key in entry if key.startswith("GUESTKIT_J")]

    @pytest.mark.parametrize(
        ("level", "priority"),
        [
            (logging.DEBUG, b"7"),
            (logging.INFO, b"6"),
            (25, b"5"),
            (logging.WARNING, b"4"),
            (logging.ERROR, b"3"),
            (logging.CRITICAL, b"2"),
        ],
    )
    def test_priorities(self, journal: socket.socket, level: int, priority: bytes) -> None:
        logs.setup_logging("journal", "debug")
        log.log(level, "at %d", level)
        entry = receive_entry(journal)
        assert (entry["MESSAGE"], entry["PRIORITY"]) == (f"at {level}".encode(), priority)

    def test_values_with_newlines_use_the_binary_safe_form(self, journal: socket.socket) -> None:
        logs.setup_logging("journal")
        log.error("traceback line1\nline2", extra={"job_id": "j-43", "state": "a\nb"})
        raw = journal.recv(1 << 16)
        assert b"GUESTKIT_STATE\n" + struct.pack("<Q", 3) + b"a\nb\n" in raw
        entry = parse_native(raw)
        assert entry["MESSAGE"] == b"[j-43] traceback line1\nline2"
        assert entry["GUESTKIT_STATE"] == b"a\nb"

    def test_exception_text_is_in_the_message(self, journal: socket.socket) -> None:
        logs.setup_logging("journal")
        try:
            raise ValueError("bad image")
        except ValueError:
            log.exception("inspect failed", extra={"job_id": "j-1"})
        message = receive_entry(journal)["MESSAGE"].decode()
        assert message.startswith("[j-1] inspect failed\nTraceback (most recent call last):")
        assert message.endswith("ValueError: bad image")

    def test_a_record_too_big_for_a_datagram_goes_in_a_sealed_memfd(
        self, journal: socket.socket
    ) -> None:
        logs.setup_logging("journal")
        big = "x" * (600 * 1024)
        log.info("%s", big, extra={"job_id": "j-big"})
        fds = array.array("i")
        data, ancdata, _, _ = journal.recvmsg(1 << 16, 256)  # room for creds and rights
        assert data == b""
        scm_rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS)
        rights = [item for level, kind, item in ancdata if (level, kind) == scm_rights]
        assert len(rights) == 1
        fds.frombytes(rights[0][: fds.itemsize])
        with os.fdopen(fds[0], "rb") as memfd:
            seals = fcntl.fcntl(memfd.fileno(), fcntl.F_GET_SEALS)
            memfd.seek(0)  # the sender's write moved the shared offset
            payload = memfd.read()
        assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK
        entry = parse_native(payload)
        assert entry["MESSAGE"] == b"[j-big] " + big.encode()
        assert entry["GUESTKIT_JOB_ID"] == b"j-big"

    def test_falls_back_to_prefixed_stderr_without_a_journal(
        self,
        monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        monkeypatch.setenv(logs.JOURNAL_SOCKET_ENV, str(tmp_path / "absent.sock"))
        logs.setup_logging("journal")
        log.error("first\nsecond", extra={"job_id": "j-7"})
        log.info("plain")
        log.warning("careful")
        assert capsys.readouterr().err == "<3>[j-7] first\n<3>second\n<6>plain\n<4>careful\n"

    def test_after_a_failure_the_journal_rests_then_is_tried_again(
        self,
        monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        path = tmp_path / "late.sock"
        monkeypatch.setenv(logs.JOURNAL_SOCKET_ENV, str(path))
        logs.setup_logging("journal")
        log.info("before journald")
        late = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        late.bind(str(path))
        with late:
            log.info("journald just started")  # still inside the rest period: no send attempt
            assert capsys.readouterr().err == "<6>before journald\n<6>journald just started\n"
            handler = logs._installed
            assert isinstance(handler, logs.JournalHandler)
            assert handler._retry_at > time.monotonic() + logs.JOURNAL_RETRY_AFTER - 1
            handler._retry_at = 0.0  # the rest period is over
            log.info("back in the journal")
            late.settimeout(5)
            assert parse_native(late.recv(1 << 16))["MESSAGE"] == b"back in the journal"
            assert capsys.readouterr().err == ""

    def test_child_after_fork_sends_from_its_own_socket(self, journal: socket.socket) -> None:
        logs.setup_logging("journal")
        log.info("parent first")
        receive_entry(journal)
        pid = os.fork()
        if pid == 0:
            log.info("from child")
            os._exit(0)
        os.waitpid(pid, 0)
        _, ancdata, _, _ = journal.recvmsg(1 << 16, socket.CMSG_SPACE(12))
        assert struct.unpack("3i", ancdata[0][2][:12])[0] == pid
        log.info("parent again")
        assert receive_entry(journal)["MESSAGE"] == b"parent again"
        assert_nothing_waiting(journal)


class TestNeverRaises:
    @pytest.mark.parametrize("fmt", ["human", "json", "journal"])
    def test_bad_arguments_are_reported_not_raised(
        self, fmt: str, capfd: pytest.CaptureFixture[str], journal: socket.socket
    ) -> None:
        logs.setup_logging(fmt)
        log.info("%d items", "not-a-number", extra={"job_id": "j-1"})
        err = capfd.readouterr().err
        assert "unloggable record guestkit.test" in err
        assert "'%d items'" in err

    @pytest.mark.parametrize("fmt", ["human", "json", "journal"])
    def test_closed_stderr_is_survived(
        self,
        fmt: str,
        monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path,
        capfd: pytest.CaptureFixture[str],
    ) -> None:
        monkeypatch.setenv(logs.JOURNAL_SOCKET_ENV, str(tmp_path / "absent.sock"))
        logs.setup_logging(fmt)
        closed = open(os.devnull, "w")  # noqa: SIM115
        closed.close()
        monkeypatch.setattr(sys, "stderr", closed)
        log.error("nowhere to go")
        assert "unloggable record guestkit.test" in capfd.readouterr().err  # raw fd 2 still works
        monkeypatch.setattr(sys, "stderr", None)
        log.error("still nowhere")
        assert capfd.readouterr().err == ""


def test_syslog_priority_table() -> None:
    levels = [5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 60]
    assert [logs.syslog_priority(n) for n in levels] == [7, 7, 7, 6, 5, 4, 4, 3, 3, 2, 2]


def test_journal_field_encoding() -> None:
    assert logs.journal_field("MESSAGE", "hi") == b"MESSAGE=hi\n"
    assert logs.journal_field("N", 7) == b"N=7\n"
    assert logs.journal_field("M", "a\nb") == b"M\n\x03\x00\x00\x00\x00\x00\x00\x00a\nb\n"
    assert logs.journal_field("E", "a=b") == b"E=a=b\n"

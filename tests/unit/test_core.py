"""Pure pieces: the state table, the job document, file primitives, pipe framing, settings."""

from __future__ import annotations

import os
import select
import threading
from pathlib import Path

import orjson
import pytest
from conftest import spool_at

from worker import config, fsutil
from worker.errors import ConfigError, ErrorCode, IllegalTransition, JobRejected, UnsafeFile
from worker.progress import MessageReader, MessageTooLarge, MessageWriter
from worker.spec import parse_job
from worker.spool import Spool, original_name
from worker.states import TERMINAL, TRANSITIONS, JobState, advance

# -- states ---------------------------------------------------------------------------------


def test_the_protocol_path_is_allowed() -> None:
    s = JobState.PENDING
    for nxt in (JobState.QUEUED, JobState.ASSIGNED, JobState.RUNNING, JobState.COMPLETED):
        s = advance(s, nxt)
    assert s is JobState.COMPLETED


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
def test_terminal_states_never_change(terminal: JobState) -> None:
    assert not any(src is terminal for src, _ in TRANSITIONS)
    with pytest.raises(IllegalTransition, match=f"from {terminal.value} to queued"):
        advance(terminal, JobState.QUEUED)


def test_timeout_only_from_running() -> None:
    assert {src for src, dst in TRANSITIONS if dst is JobState.TIMEOUT} == {JobState.RUNNING}
    with pytest.raises(IllegalTransition):
        advance(JobState.QUEUED, JobState.TIMEOUT)


# -- the job document -------------------------------------------------------------------------

BASE = {"version": "1.0", "job_id": "j-1", "kind": "VMOperation", "operation": "system.echo",
        "payload": {"type": "system.echo.v1", "data": {}}}


def _parse(**changes: object) -> object:
    return parse_job(orjson.dumps({**BASE, **changes}), "f.json")[0]


def test_defaults_follow_the_protocol() -> None:
    doc = _parse()
    ex = doc.execution
    assert (ex.attempt, ex.max_attempts, ex.timeout_seconds, ex.priority, ex.cancellable) == \
        (1, 1, 3600, 5, True)


def test_unknown_fields_are_kept_at_every_level() -> None:
    doc = _parse(future={"x": 1}, execution={"shiny": True})
    assert doc.model_extra == {"future": {"x": 1}}
    assert doc.execution.model_extra == {"shiny": True}


@pytest.mark.parametrize(("change", "code", "text"), [
    ({"version": "1.1"}, ErrorCode.UNSUPPORTED_VERSION, "field 'version'"),
    ({"kind": "Pod"}, ErrorCode.VALIDATION_ERROR, "field 'kind'"),
    ({"operation": "echo"}, ErrorCode.VALIDATION_ERROR, "field 'operation'"),
    ({"job_id": "a/b"}, ErrorCode.VALIDATION_ERROR, "field 'job_id'"),
    ({"job_id": "x" * 129}, ErrorCode.VALIDATION_ERROR, "field 'job_id'"),
    ({"execution": {"priority": 11}}, ErrorCode.VALIDATION_ERROR, "execution.priority"),
    ({"execution": {"timeout_seconds": "60"}}, ErrorCode.VALIDATION_ERROR, "timeout_seconds"),
    ({"execution": {"attempt": 3, "max_attempts": 2}}, ErrorCode.VALIDATION_ERROR,
     "attempt (3) must not exceed max_attempts (2)"),
    ({"execution": {"deadline": "tomorrow"}}, ErrorCode.VALIDATION_ERROR, "execution.deadline"),
    ({"payload": {"type": "echo", "data": 1}}, ErrorCode.VALIDATION_ERROR, "payload.type"),
    ({"metadata": {"labels": {"a": 1}}}, ErrorCode.VALIDATION_ERROR, "metadata.labels.a"),
])
def test_each_bad_field_is_named(change: dict, code: ErrorCode, text: str) -> None:
    with pytest.raises(JobRejected) as info:
        _parse(**change)
    assert info.value.code is code
    assert text in info.value.message
    assert info.value.message.startswith("job ")


def test_a_missing_field_says_so() -> None:
    raw = {k: v for k, v in BASE.items() if k != "payload"}
    with pytest.raises(JobRejected, match="field 'payload': required but missing"):
        parse_job(orjson.dumps(raw), "f.json")


# -- files ------------------------------------------------------------------------------------


def test_publish_noreplace_keeps_the_first(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    for name, data in (("a.tmp", b"first"), ("b.tmp", b"second")):
        (tmp_path / name).write_bytes(data)
    assert fsutil.publish_noreplace(tmp_path / "a.tmp", target)
    assert not fsutil.publish_noreplace(tmp_path / "b.tmp", target)
    assert target.read_bytes() == b"first"
    assert sorted(os.listdir(tmp_path)) == ["r.json"]  # neither written name is left


def test_write_atomic_replaces_whole(tmp_path: Path) -> None:
    target = tmp_path / "s.json"
    fsutil.write_atomic(target, b"old")
    fsutil.write_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["s.json"]


def test_open_regular_refuses_symlinks_fifos_and_dirs(tmp_path: Path) -> None:
    (tmp_path / "real").write_text("x")
    os.symlink(tmp_path / "real", tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    for name, text in (("link", "symbolic link"), ("fifo", "FIFO"), ("dir", "directory")):
        with pytest.raises(UnsafeFile, match=text):
            fsutil.open_regular(tmp_path / name)
    fd, st = fsutil.open_regular(tmp_path / "real")
    assert fsutil.read_capped(fd, st.st_size, 10) == b"x"
    os.close(fd)


def test_read_capped_refuses_a_file_over_the_limit(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * 2048)
    fd, st = fsutil.open_regular(tmp_path / "big")
    with pytest.raises(UnsafeFile, match="2048 bytes, over the limit of 1024"):
        fsutil.read_capped(fd, st.st_size, 1024)
    os.close(fd)


def test_has_writer_sees_an_open_writer(tmp_path: Path) -> None:
    path = tmp_path / "w.json"
    with open(path, "wb") as writer:
        writer.write(b"{")
        fd, _ = fsutil.open_regular(path)
        assert fsutil.has_writer(fd)
        os.close(fd)
    fd, _ = fsutil.open_regular(path)
    assert not fsutil.has_writer(fd)
    os.close(fd)


def test_original_name_undoes_the_claim_prefix() -> None:
    assert original_name("01795789305222795077-000003-my-job.json") == "my-job.json"
    assert original_name("plain.json") == "plain.json"
    assert original_name("01795789305222795077-000004.queue-1733600000000-7.json") == \
        "queue-1733600000000-7.json"


# -- pipe framing --------------------------------------------------------------------------------


def test_messages_cross_the_pipe_whole_even_in_pieces() -> None:
    r, w = os.pipe()
    reader = MessageReader(r, 1 << 20)
    writer = MessageWriter(w, 1 << 20)
    big = {"type": "result", "data": "z" * 200_000}
    t = threading.Thread(target=lambda: (writer.send({"type": "progress", "percent": 5}),
                                         writer.send(big), os.close(w)))
    t.start()
    got: list[dict] = []
    while not reader.eof:
        select.select([r], [], [], 5)
        got += reader.read_available()
    t.join()
    assert got == [{"type": "progress", "percent": 5}, big]
    reader.close()


def test_a_line_over_the_cap_is_refused_on_both_ends() -> None:
    r, w = os.pipe()
    with pytest.raises(MessageTooLarge, match="exceeds the limit of 4096 bytes"):
        MessageWriter(w, 4096).send({"type": "result", "data": "x" * 5000})
    os.write(w, b"y" * 5000)
    with pytest.raises(MessageTooLarge):
        MessageReader(r, 4096).read_available()
    os.close(r)
    os.close(w)


def test_a_line_that_is_not_an_object_is_marked_invalid() -> None:
    r, w = os.pipe()
    os.write(w, b"[1,2]\nnot json\n")
    os.close(w)
    msgs = MessageReader(r, 4096).read_available()
    assert [m["type"] for m in msgs] == ["invalid", "invalid"]
    os.close(r)


# -- settings ---------------------------------------------------------------------------------------


def test_precedence_flags_over_environment_over_file_over_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text("[worker]\nmax_concurrent = 2\npool = 'file'\nkill_grace = 9.0\n")
    env = {"GUESTKIT_WORKER_POOL": "env", "GUESTKIT_WORKER_MAX_CONCURRENT": "3"}
    s, src = config.load({"max_concurrent": 8}, cfg, env)
    assert (s.max_concurrent, s.pool, s.kill_grace, s.shutdown_timeout) == (8, "env", 9.0, 30.0)
    assert (src["max_concurrent"], src["pool"], src["kill_grace"], src["shutdown_timeout"]) == \
        ("flag", "environment", f"file {cfg}", "default")


@pytest.mark.parametrize(("text", "message"), [
    ("[worker]\nmax_concurrent = 'lots'\n", "field 'max_concurrent': expected a valid integer"),
    ("[worker]\nmax_concurrent = 0\n", "field 'max_concurrent': expected greater than or equal"),
    ("[worker]\nmax_concurent = 2\n", "unknown key(s) max_concurent"),
    ("[worker\n", "not valid TOML"),
    ("[worker]\nlog_format = 'xml'\n", "field 'log_format'"),
    ("[worker]\nmetrics_addr = ':99999'\n", "field 'metrics_addr': expected host:port"),
])
def test_a_bad_config_file_is_a_clear_error_naming_the_key(tmp_path: Path, text: str,
                                                         message: str) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load({}, cfg, {})
    assert message in str(info.value)


def test_a_bad_environment_value_names_its_variable() -> None:
    with pytest.raises(ConfigError, match=r"\(environment GUESTKIT_WORKER_KILL_GRACE\).*kill_grace"):
        config.load({}, None, {"GUESTKIT_WORKER_KILL_GRACE": "soon"})


def test_a_misspelt_environment_variable_is_an_error_with_a_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        config.load({}, None, {"GUESTKIT_WORKER_MAX_CONCURENT": "2", "GUESTKIT_WORKER_ID": "w"})
    assert str(info.value) == (
        "environment: no such setting: GUESTKIT_WORKER_ID (did you mean "
        "GUESTKIT_WORKER_WORKER_ID?), GUESTKIT_WORKER_MAX_CONCURENT (did you mean "
        "GUESTKIT_WORKER_MAX_CONCURRENT?)")


def test_a_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        config.load({}, tmp_path / "nope.toml", {})


def test_only_a_name_materialize_gives_reads_as_a_queue_message(tmp_path: Path) -> None:
    assert Spool.message_of(spool_at(tmp_path).materialize("1733600000000-7", b"{}")) == \
        "1733600000000-7"
    assert Spool.message_of("01733600000000000000-000042.queue-1733600000000-7.json") == \
        "1733600000000-7"
    assert Spool.message_of("01733600000000000000-1000000.queue-1-2.json") == "1-2"  # seq 7 digits
    # what a claim makes of inbox files named like one: never a message
    for inbox_name in ("queue-1-2.json", "x.queue-1-2.json", "nightly-queue-2024-12.json"):
        assert Spool.message_of(f"01733600000000000000-000042-{inbox_name}") is None

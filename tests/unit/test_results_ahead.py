"""A result is written at once and put under its name by `sync_results`, into the empty file
made ahead for it; nothing of it is left behind by the dead."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import orjson
import pytest
from conftest import spool_at

from worker.spool import Spool


def _hidden(spool: Spool) -> list[str]:
    return sorted(n for n in os.listdir(spool.results) if n.startswith("."))


def test_the_next_result_is_written_into_the_file_made_ahead(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    spool.premake_result()
    [ahead] = _hidden(spool)
    inode = (spool.results / ahead).stat().st_ino
    assert spool.publish_result("j1", {"job_id": "j1", "status": "completed"})
    assert spool.sync_results() == []
    assert spool.result_path("j1").stat().st_ino == inode
    assert orjson.loads(spool.result_path("j1").read_bytes())["status"] == "completed"
    assert _hidden(spool) == []
    assert spool.publish_result("j2", {"job_id": "j2"})  # none made ahead: made on the spot
    assert spool.sync_results() == []
    assert _hidden(spool) == []
    spool.premake_result()
    spool.premake_result()  # one at a time
    assert len(_hidden(spool)) == 1


def test_an_existing_result_is_kept_and_the_file_made_ahead_waits_for_the_next(
        tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    assert spool.publish_result("j1", {"first": True})
    spool.sync_results()
    spool.premake_result()
    [ahead] = _hidden(spool)
    assert not spool.publish_result("j1", {"first": False})
    assert spool.sync_results() == []
    assert orjson.loads(spool.result_path("j1").read_bytes()) == {"first": True}
    assert _hidden(spool) == [ahead]
    assert spool.publish_result("j2", {"second": True})
    spool.sync_results()
    assert _hidden(spool) == []


def test_start_removes_what_a_killed_run_left_and_never_writes_into_it(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    assert spool.publish_result("x", {"first": True})
    spool.sync_results()
    # killed between linking x's result and unlinking the name it was written under
    os.link(spool.result_path("x"), spool.results / f".next-result-{os.getpid()}-1.tmp")
    (spool.results / ".next-result-99999-2.tmp").touch()  # another run's, never used
    assert spool.sweep_results() == []  # neither is a result waiting for its name
    assert _hidden(spool) == []
    assert spool.result_path("x").stat().st_nlink == 1
    assert orjson.loads(spool.result_path("x").read_bytes()) == {"first": True}


def test_start_puts_a_result_a_stopped_run_wrote_but_never_linked_under_its_name(
        tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    spool.premake_result()
    assert spool.publish_result("done-1", {"job_id": "done-1", "status": "completed"})
    assert spool.publish_result("twice", {"job_id": "twice", "status": "failed"})
    spool.premake_result()  # the run stops here: nothing linked, an empty file made ahead
    spool.result_path("twice").write_bytes(b'{"job_id": "twice", "status": "completed"}')
    (spool.results / f".next-result-{os.getpid()}-9.tmp").write_bytes(b'{"job_id": "torn"')
    again = spool_at(tmp_path)
    assert again.sweep_results() == ["done-1"]
    assert orjson.loads(again.result_path("done-1").read_bytes())["status"] == "completed"
    assert orjson.loads(again.result_path("twice").read_bytes())["status"] == "completed"
    assert not again.result_path("torn").exists()
    assert _hidden(again) == []


def test_a_file_made_ahead_that_is_no_longer_empty_is_not_written_into(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    spool.premake_result()
    [ahead] = _hidden(spool)
    os.link(spool.results / ahead, tmp_path / "another-name")  # not ours alone any more
    assert spool.publish_result("y", {"y": 1})
    spool.sync_results()
    assert (tmp_path / "another-name").read_bytes() == b""
    assert orjson.loads(spool.result_path("y").read_bytes()) == {"y": 1}


def test_a_result_is_under_its_name_only_once_synced_and_counts_as_there_before(
        tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    spool.premake_result()
    assert spool.publish_result("j1", {"n": 1})
    assert not spool.result_path("j1").exists()  # written, fsync'd and linked by sync_results
    assert spool.unsynced and spool.has_result("j1") and spool.read_result("j1") == {"n": 1}
    assert not spool.publish_result("j1", {"n": 2})  # the pass's first result is the one
    assert spool.sync_results() == []
    assert not spool.unsynced
    assert orjson.loads(spool.result_path("j1").read_bytes()) == {"n": 1}
    assert _hidden(spool) == []


def test_a_name_taken_before_the_sync_keeps_its_file(tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    assert spool.publish_result("j1", {"ours": True})
    spool.result_path("j1").write_bytes(b'{"theirs": true}')  # another writer, meanwhile
    assert spool.sync_results() == ["j1"]
    assert orjson.loads(spool.result_path("j1").read_bytes()) == {"theirs": True}
    assert _hidden(spool) == []


def _immutable(path: Path, on: bool) -> None:
    subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("chattr") is None,
                    reason="makes the results dir immutable: needs root and chattr (CI has both)")
def test_a_sync_that_fails_keeps_every_result_not_yet_linked_for_the_next(
        tmp_path: Path) -> None:
    spool = spool_at(tmp_path)
    assert spool.publish_result("a", {"a": 1}) and spool.publish_result("b", {"b": 2})
    try:
        _immutable(spool.results, True)
    except subprocess.CalledProcessError:
        pytest.skip("this filesystem has no immutable attribute")
    try:
        with pytest.raises(PermissionError):
            spool.sync_results()  # link() is refused
    finally:
        _immutable(spool.results, False)
    assert spool.unsynced and spool.has_result("a") and spool.has_result("b")
    assert spool.read_result("b") == {"b": 2}
    assert not spool.result_path("a").exists() and not spool.result_path("b").exists()
    assert spool.sync_results() == []
    assert orjson.loads(spool.result_path("a").read_bytes()) == {"a": 1}
    assert orjson.loads(spool.result_path("b").read_bytes()) == {"b": 2}
    assert _hidden(spool) == []

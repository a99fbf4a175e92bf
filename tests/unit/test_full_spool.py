"""The spool's writes on a full disk fail whole: what was written stays for another try, and no
file is moved without its record (a small tmpfs filled to the last page; mounting needs root)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Disk, scratch_dir, small_disk, spool_at

from worker import fsutil
from worker.shortage import out_of_space
from worker.spool import ACTIVE

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def disk() -> Iterator[Disk]:
    with small_disk(scratch_dir(), "1m") as d:
        yield d


def test_a_rejection_without_room_for_its_record_leaves_the_file_where_it_was(disk: Disk) -> None:
    spool = spool_at(disk.mount)
    src = spool.path(ACTIVE, "0001-000000-bad.json")
    Path(src).write_bytes(b"{")
    disk.fill()
    with pytest.raises(OSError) as failed:
        spool.reject(src, {"job_id": None, "code": "VALIDATION_ERROR", "message": "not JSON"})
    assert out_of_space(failed.value)
    assert Path(src).read_bytes() == b"{"
    assert os.listdir(spool.rejected) == []
    disk.free()
    dest = spool.reject(src, {"job_id": None, "code": "VALIDATION_ERROR", "message": "not JSON"})
    assert sorted(os.listdir(spool.rejected)) == ["bad.json", "bad.json.error.json"]
    assert dest == spool.rejected / "bad.json" and not os.path.exists(src)


def test_a_result_that_cannot_be_linked_stays_written_for_another_try(disk: Disk,
                                                                       tmp_path: Path) -> None:
    written = disk.mount / ".result.tmp"
    written.write_bytes(b"{}")
    with pytest.raises(OSError) as failed:  # another filesystem: the link is refused
        fsutil.publish_noreplace(written, tmp_path / "j-result.json")
    assert failed.value.errno == errno.EXDEV
    assert written.read_bytes() == b"{}"
    assert fsutil.publish_noreplace(written, disk.mount / "j-result.json")
    assert not written.exists() and (disk.mount / "j-result.json").read_bytes() == b"{}"


def test_a_result_staged_then_taken_back_leaves_nothing(disk: Disk) -> None:
    spool = spool_at(disk.mount)
    spool.premake_result()
    assert spool.publish_result("j1", {"job_id": "j1"})
    spool.unstage("j1")
    assert not spool.unsynced
    assert spool.sync_results() == []
    assert [n for n in os.listdir(spool.results)] == []
    disk.fill()
    with pytest.raises(OSError) as failed:  # no room for the result: nothing is staged
        spool.publish_result("j2", {"job_id": "j2", "data": "x" * 8192})
    assert out_of_space(failed.value) and not spool.unsynced
    assert os.listdir(spool.results) == []  # no torn file left taking space

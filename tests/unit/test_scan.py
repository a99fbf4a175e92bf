"""The start-up scan takes a small inbox oldest-named first and streams a deep one."""

from __future__ import annotations

from pathlib import Path

from conftest import spool_at

from worker.spool import Spool


def _spool(tmp_path: Path, names: list[str]) -> Spool:
    spool = spool_at(tmp_path)
    for name in names:
        (spool.inbox / name).write_bytes(b"{}")
    (spool.inbox / ".hidden.json").write_bytes(b"{}")
    (spool.inbox / "notes.txt").write_bytes(b"")
    return spool


def test_a_small_inbox_is_taken_oldest_named_first(tmp_path: Path) -> None:
    names = ["c.json", "a.json", "b.json"]
    assert list(_spool(tmp_path, names).each_inbox_name(sort_up_to=3)) == sorted(names)


def test_a_deep_inbox_is_streamed_every_job_file_once(tmp_path: Path) -> None:
    names = [f"{i:03d}.json" for i in range(50)]
    got = list(_spool(tmp_path, names).each_inbox_name(sort_up_to=10))
    assert sorted(got) == names and len(got) == len(set(got))

"""fsutil.FilePool: atomic writes and removals that reuse inodes instead of freeing them."""

from __future__ import annotations

import os
from pathlib import Path

from worker.fsutil import FilePool


def _pool(tmp_path: Path, keep: int = 1024) -> FilePool:
    pool = FilePool(tmp_path, keep=keep)
    pool.open()
    return pool


def _visible(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if not n.startswith("."))


def test_a_removed_file_lends_its_inode_to_the_next_write(tmp_path: Path) -> None:
    pool = _pool(tmp_path)
    pool.write("a.json", b'{"a": 1}')
    first = (tmp_path / "a.json").stat().st_ino
    pool.remove("a.json")
    assert _visible(tmp_path) == []
    pool.write("b.json", b'{"b": 2}')
    assert (tmp_path / "b.json").stat().st_ino == first
    assert (tmp_path / "b.json").read_bytes() == b'{"b": 2}'  # truncated, not appended
    assert os.listdir(tmp_path / ".parked") == []


def test_replacing_a_file_parks_the_old_inode_and_readers_see_whole_files(tmp_path: Path) -> None:
    pool = _pool(tmp_path)
    target = tmp_path / "s.json"
    pool.write(target.name, b"x" * 500)
    pool.remove("missing.json")  # nothing there: fine
    pool.write("other.json", b"1")
    pool.remove("other.json")  # one spare inode now
    inodes = {target.stat().st_ino, *(p.stat().st_ino for p in (tmp_path / ".parked").iterdir())}
    for i in range(5):
        pool.write(target.name, f"short {i}".encode())
        assert target.read_bytes() == f"short {i}".encode()
        now = {target.stat().st_ino, *(p.stat().st_ino for p in (tmp_path / ".parked").iterdir())}
        assert now == inodes  # the same two inodes take turns: none created, none freed
    assert _visible(tmp_path) == ["s.json"]


def test_beyond_keep_a_removed_file_is_really_unlinked(tmp_path: Path) -> None:
    pool = _pool(tmp_path, keep=1)
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_bytes(b"1")
    pool.remove("a.json")
    pool.remove("b.json")
    assert _visible(tmp_path) == []
    assert len(os.listdir(tmp_path / ".parked")) == 1


def test_open_takes_back_parked_and_half_written_files(tmp_path: Path) -> None:
    pool = _pool(tmp_path)
    pool.write("a.json", b"1")
    pool.remove("a.json")
    (tmp_path / ".b.json.123.tmp").write_bytes(b"torn")  # a crash between write and rename
    again = _pool(tmp_path)
    assert sorted(again.free) == ["0", "1"]
    assert _visible(tmp_path) == [] and not (tmp_path / ".b.json.123.tmp").exists()
    again.write("c.json", b"c")
    again.write("d.json", b"d")
    assert (tmp_path / "c.json").read_bytes() == b"c" and (tmp_path / "d.json").read_bytes() == b"d"
    assert os.listdir(tmp_path / ".parked") == []


def test_with_nothing_parked_a_write_creates_the_file(tmp_path: Path) -> None:
    pool = _pool(tmp_path)
    pool.write("new.json", b"fresh")
    assert (tmp_path / "new.json").read_bytes() == b"fresh"
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o644


def test_without_rename_exchange_a_replacement_still_lands_whole(tmp_path: Path,
                                                                monkeypatch) -> None:
    import errno

    import worker.fsutil as fsutil

    def refused(a: Path, b: Path) -> None:
        raise OSError(errno.EINVAL, "RENAME_EXCHANGE not supported here")

    pool = _pool(tmp_path)
    pool.write("s.json", b"old")
    pool.write("x.json", b"x")
    pool.remove("x.json")
    monkeypatch.setattr(fsutil, "exchange", refused)  # a filesystem we cannot have here
    pool.write("s.json", b"new")
    assert (tmp_path / "s.json").read_bytes() == b"new"
    assert _visible(tmp_path) == ["s.json"]


def test_a_parked_file_removed_behind_its_back_is_replaced_by_a_new_one(tmp_path: Path) -> None:
    pool = _pool(tmp_path)
    pool.write("a.json", b"a")
    pool.remove("a.json")
    for parked in (tmp_path / ".parked").iterdir():
        parked.unlink()  # an operator cleaning up hidden files
    pool.write("b.json", b"b")
    assert (tmp_path / "b.json").read_bytes() == b"b"

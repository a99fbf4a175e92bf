"""Work dirs: only a dir a job left exactly blank is kept, and a kept one is handed on intact."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from worker.workdirs import Workdirs


def _made(root: Path, name: str) -> Path:
    """A work dir as a job's child makes it: 0700, two empty 0600 logs."""
    d = root / name
    d.mkdir(mode=0o700)
    for log in ("stdout.log", "stderr.log"):
        (d / log).touch(mode=0o600)
    return d


@pytest.fixture
def dirs(tmp_path: Path) -> Workdirs:
    w = Workdirs(tmp_path / "work", None, None)
    w.root.mkdir()
    w.open()
    return w


def test_a_blank_dir_is_kept_and_handed_to_the_next_job(dirs: Workdirs) -> None:
    done = _made(dirs.root, "quiet")
    inode = done.stat().st_ino
    assert dirs.recycle(done)
    assert not done.exists()
    nxt = dirs.path("next")
    assert dirs.provide(nxt)
    assert nxt.stat().st_ino == inode
    assert sorted(os.listdir(nxt)) == ["stderr.log", "stdout.log"]
    assert not dirs.provide(dirs.path("another"))  # that was the only one


def _file_left(d: Path) -> None:
    (d / "scratch.bin").write_bytes(b"x")


def _output(d: Path) -> None:
    (d / "stdout.log").write_text("hello\n")


def _subdir(d: Path) -> None:
    (d / "sub").mkdir()


def _hard_link(d: Path) -> None:
    os.link(d / "stdout.log", d.parent / "outside-link")


def _symlinked_log(d: Path) -> None:
    (d / "stderr.log").unlink()
    (d / "stderr.log").symlink_to("/etc/passwd")


def _fifo_log(d: Path) -> None:
    (d / "stderr.log").unlink()
    os.mkfifo(d / "stderr.log")


def _xattr_on_log(d: Path) -> None:
    os.setxattr(d / "stdout.log", "user.note", b"x")


def _xattr_on_dir(d: Path) -> None:
    os.setxattr(d, "user.note", b"x")


def _log_missing(d: Path) -> None:
    (d / "stdout.log").unlink()


def _space_kept(d: Path) -> None:  # size 0, blocks allocated: space carried to the next job
    subprocess.run(["fallocate", "--keep-size", "-l", "1M", str(d / "stdout.log")], check=True)


def _sync_log(d: Path) -> None:  # chattr +S: every write of the next job synchronous
    subprocess.run(["chattr", "+S", str(d / "stderr.log")], check=True)


def _dirsync_dir(d: Path) -> None:
    subprocess.run(["chattr", "+D", str(d)], check=True)


def _grown_dir(d: Path) -> None:  # a dir keeps the size its most entries gave it
    for i in range(400):
        (d / f"entry-{i:04d}-with-a-long-enough-name").touch()
    for i in range(400):
        (d / f"entry-{i:04d}-with-a-long-enough-name").unlink()


@pytest.mark.parametrize("leave", [_file_left, _output, _subdir, _hard_link, _symlinked_log,
                                   _fifo_log, _xattr_on_log, _xattr_on_dir, _log_missing,
                                   _space_kept, _sync_log, _dirsync_dir, _grown_dir])
def test_a_dir_the_job_changed_is_never_kept(dirs: Workdirs, leave: Callable[[Path], None]) -> None:
    d = _made(dirs.root, "busy")
    try:
        leave(d)
    except (OSError, subprocess.CalledProcessError) as e:  # e.g. no user xattrs, no chattr
        pytest.skip(f"this filesystem refuses {leave.__name__}: {e}")
    if leave is _grown_dir and d.stat().st_size <= d.stat().st_blksize:
        pytest.skip("directories here do not keep their size")
    assert not dirs.recycle(d)
    assert d.is_dir()  # still the job's, where it left it
    assert dirs.free == []


def test_a_symlink_in_place_of_the_dir_is_not_followed(dirs: Workdirs, tmp_path: Path) -> None:
    target = _made(tmp_path, "elsewhere")
    link = dirs.root / "job"
    link.symlink_to(target)
    assert not dirs.recycle(link)
    assert link.is_symlink() and target.is_dir()


def test_modes_and_times_a_job_changed_are_reset(dirs: Workdirs) -> None:
    d = _made(dirs.root, "chmodded")
    d.chmod(0o777)
    (d / "stdout.log").chmod(0o666)
    for p in (d, d / "stdout.log", d / "stderr.log"):
        os.utime(p, ns=(1_234_567_891, 1_234_567_891))  # a number left for the next job
    assert dirs.recycle(d)
    nxt = dirs.path("next")
    assert dirs.provide(nxt)
    assert nxt.stat().st_mode & 0o7777 == 0o700
    assert {(nxt / n).stat().st_mode & 0o7777 for n in ("stdout.log", "stderr.log")} == {0o600}
    assert all(p.stat().st_mtime_ns != 1_234_567_891
               for p in (nxt, nxt / "stdout.log", nxt / "stderr.log"))


def test_an_existing_dir_is_never_replaced(dirs: Workdirs) -> None:
    assert dirs.recycle(_made(dirs.root, "quiet"))
    earlier = dirs.root / "retried"
    earlier.mkdir()  # an earlier attempt's dir, even an empty one
    assert not dirs.provide(earlier)
    assert os.listdir(earlier) == []
    assert len(dirs.free) == 1  # the blank is still there for another job


def test_only_so_many_blanks_are_kept(tmp_path: Path) -> None:
    w = Workdirs(tmp_path / "work", None, None, keep=2)
    w.root.mkdir()
    w.open()
    kept = [w.recycle(_made(w.root, f"j{i}")) for i in range(3)]
    assert kept == [True, True, False]
    assert (w.root / "j2").is_dir()  # left as the job's dir, as without recycling


def test_start_keeps_clean_blanks_and_spare_dirs_and_removes_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "work"
    root.mkdir()
    first = Workdirs(root, None, None)
    first.open()
    assert first.recycle(_made(root, "a"))
    dirty = first.blank / "77"
    _made(first.blank, "77")
    (dirty / "stdout.log").write_text("half a job")  # as a crash might leave one
    _made(root, ".spare-3")  # a spare's dir, never used
    (root / ".spare-4").mkdir()  # one whose spare died before making its logs
    job_dir = _made(root, "finished-job")  # a job's dir is the job's, whatever it holds

    second = Workdirs(root, None, None)
    assert second.open() == 2
    assert not dirty.exists()
    assert not (root / ".spare-3").exists() and not (root / ".spare-4").exists()
    assert job_dir.is_dir()
    made = {second.path("x"), second.path("y")}
    assert all(second.provide(p) for p in made)
    assert not second.provide(second.path("z"))

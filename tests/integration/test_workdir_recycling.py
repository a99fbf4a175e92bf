"""A job that leaves its work dir blank hands it to a later job; any other dir stays its own.

Needs root: recycling relies on each job being PID 1 of its own namespace (reaped = gone).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Worker, job, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="job PID namespaces need root")


def _blanks(w: Worker) -> list[Path]:
    d = w.work / ".blank"
    return sorted(d.iterdir()) if d.is_dir() else []


def _recycled(w: Worker, job_id: str) -> Path:
    """Wait until `job_id`'s dir has become a blank; return the only blank."""
    def gone() -> list[Path] | None:
        blanks = _blanks(w)
        return blanks if not (w.work / job_id).exists() and len(blanks) == 1 else None
    [blank] = wait_until(gone, [w.work, w.work / ".blank"], 20, f"{job_id}'s dir to be recycled")
    return blank


def test_a_job_that_leaves_nothing_hands_its_dir_to_the_next(
        make_worker: Callable[..., Worker]) -> None:
    w = make_worker("--max-concurrent", "1", "--no-spares").start()
    w.drop(job("quiet"))
    assert w.wait_result("quiet")["status"] == "completed"
    inode = _recycled(w, "quiet").stat().st_ino
    w.drop(job("loud", "test.print"))
    assert w.wait_result("loud")["status"] == "completed"
    assert (w.work / "loud").stat().st_ino == inode
    assert (w.work / "loud" / "stdout.log").read_text() == "hello on stdout\n"
    assert _blanks(w) == []
    shown = w.cli("logs", "quiet")
    assert shown.returncode == 0 and shown.stdout == "--- stdout ---\n--- stderr ---\n"
    assert w.cli("logs", "never-ran", check=False).returncode != 0


def test_a_job_that_opened_up_its_dir_hands_on_a_closed_one(
        make_worker: Callable[..., Worker]) -> None:
    w = make_worker("--max-concurrent", "1", "--no-spares").start()
    w.drop(job("opener", "test.probe", {"actions": [["chmod", [".", "777"]]]}))
    res = w.wait_result("opener")
    assert res["data"]["outcomes"] == ["ok None"]
    inode = _recycled(w, "opener").stat().st_ino
    w.drop(job("after", "test.print"))
    w.wait_result("after")
    d = w.work / "after"
    assert d.stat().st_ino == inode
    assert d.stat().st_mode & 0o7777 == 0o700
    assert (d / "stdout.log").stat().st_mode & 0o7777 == 0o600


def test_a_job_that_leaves_a_file_or_an_xattr_keeps_its_dir(
        make_worker: Callable[..., Worker]) -> None:
    w = make_worker("--max-concurrent", "1", "--no-spares").start()
    w.drop(job("writer", "test.probe", {"actions": [["write", "left.txt"]]}))
    w.drop(job("marker", "test.probe", {"actions": [["xattr", "."]]}))
    for job_id in ("writer", "marker"):
        assert w.wait_result(job_id)["data"]["outcomes"] in (["ok 1"], ["ok None"])
    w.drop(job("quiet"))
    w.wait_result("quiet")
    blank = _recycled(w, "quiet")  # reaps are being handled: the others had theirs first
    assert w.stop() == 0
    assert (w.work / "writer" / "left.txt").read_text() == "x"
    assert os.getxattr(w.work / "marker", "user.note") == b"left by a job"
    assert sorted(os.listdir(blank)) == ["stderr.log", "stdout.log"]


def test_a_job_that_did_not_complete_keeps_its_dir(make_worker: Callable[..., Worker]) -> None:
    w = make_worker("--max-concurrent", "1", "--no-spares").start()
    w.drop(job("refused", "test.raise", {"permanent": True, "message": "no"}))
    assert w.wait_result("refused")["status"] == "failed"
    w.drop(job("quiet"))
    w.wait_result("quiet")
    _recycled(w, "quiet")  # reaps are being handled: the failed job's came first
    assert w.stop() == 0
    assert sorted(os.listdir(w.work / "refused")) == ["stderr.log", "stdout.log"]


def _holding(w: Worker, inode: int) -> str | None:
    """Which kind of dir under work/ has `inode` now: '.blank', '.spare-', or None."""
    for kind, dirs in ((".blank", (w.work / ".blank").glob("*")), (".spare-", w.work.glob(".spare-*"))):
        for d in dirs:
            try:
                if d.stat().st_ino == inode:
                    return kind
            except FileNotFoundError:
                continue
    return None


def test_a_waiting_spare_takes_a_blank_dir(make_worker: Callable[..., Worker],
                                           tmp_path: Path) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text("[worker]\nmax_concurrent = 1\n")
    w = make_worker(env={"GUESTKIT_WORKER_CONFIG": str(cfg)}).start()
    [made] = wait_until(lambda: list(w.work.glob(".spare-*")) or None, [w.work], 20,
                        "the first spare's dir")
    inode = made.stat().st_ino  # the first job runs on that spare, in this dir
    w.drop(job("first"))
    w.wait_result("first")
    where = wait_until(lambda: _holding(w, inode), [w.work, w.work / ".blank"], 20,
                       "first's dir to be recycled")
    if where == ".blank":  # the next spare was asked for before the first job was reaped
        cfg.write_text("[worker]\nmax_concurrent = 2\n")
        w.signal(signal.SIGHUP)  # a second free slot: its spare gets the only blank dir
        wait_until(lambda: _holding(w, inode) == ".spare-", [w.work, w.work / ".blank"], 20,
                   "the new spare to wait in the first job's old dir")

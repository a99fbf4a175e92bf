"""A spool on a filesystem without renameat2's flags (NFS, most FUSE) still never replaces a
file: the checked-rename fallbacks, on a real FUSE mount made by bindfs.

Needs root (a FUSE mount other users may enter, and job PID namespaces for work dir reuse).
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Worker, job, scratch_dir, stop_workers, wait_until

from worker import fsutil

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a FUSE mount for the job user needs root")


@pytest.fixture
def fuse_worker() -> Iterator[Worker]:
    """A worker whose whole spool is on a bindfs mount of a scratch dir."""
    under, mount = scratch_dir(), scratch_dir()
    w = Worker(mount, ["--max-concurrent", "2"], None)
    try:
        subprocess.run(["bindfs", "-o", "allow_other", str(under), str(mount)], check=True)
        try:
            yield w
        finally:
            try:
                stop_workers([w], mount)  # empties the mount
            finally:
                if subprocess.run(["umount", str(mount)]).returncode != 0:
                    subprocess.run(["umount", "-l", str(mount)], check=True)  # still busy
    finally:
        shutil.rmtree(under, ignore_errors=True)
        shutil.rmtree(mount, ignore_errors=True)


def _lacks_rename_flags(directory: Path) -> None:
    """The mount really is one where the fallbacks run: renameat2 with a flag is refused."""
    (directory / "a").write_text("a")
    with pytest.raises(OSError) as refused:
        fsutil._renameat2(directory / "a", directory / "b", 1)  # RENAME_NOREPLACE
    assert refused.value.errno == errno.EINVAL
    (directory / "b").write_text("b")
    with pytest.raises(OSError) as refused:
        fsutil.exchange(directory / "a", directory / "b")
    assert refused.value.errno == errno.EINVAL
    with pytest.raises(FileExistsError):
        fsutil.rename_noreplace(directory / "a", directory / "b")
    assert (directory / "b").read_text() == "b"
    os.unlink(directory / "a")
    os.unlink(directory / "b")


def test_a_spool_without_rename_flags_runs_jobs_and_replaces_nothing(fuse_worker: Worker) -> None:
    w = fuse_worker
    _lacks_rename_flags(w.base)
    w.start()
    # Two jobs at once leave two status files parked for reuse: each later status write
    # takes one and swaps it with the file it rewrites. Then work dirs go from job to job.
    for name in ("slow-a", "slow-b"):
        w.drop(job(name, "test.sleep", {"seconds": 0.5}))
    for name in ("slow-a", "slow-b"):
        assert w.wait_result(name)["status"] == "completed"
    for i in range(4):
        w.drop(job(f"quick-{i}"))
    for i in range(4):
        assert w.wait_result(f"quick-{i}")["data"]["echo"] == {"n": f"quick-{i}"}
    # Two bad files of the same name: the second record must not replace the first.
    rejected = w.jobs / "rejected"
    w.drop(b"{first", "same.json")
    wait_until(lambda: (rejected / "same.json.error.json").exists(), [rejected], 20,
               "the first rejection")
    w.drop(b"[second", "same.json")
    wait_until(lambda: len(list(rejected.glob("*-same.json.error.json"))) == 1, [rejected], 20,
               "the second rejection, under a prefixed name")
    [second] = rejected.glob("*-same.json")
    assert (rejected / "same.json").read_bytes() == b"{first"
    assert second.read_bytes() == b"[second"
    assert sorted(os.listdir(w.jobs / "done")) == [*(f"quick-{i}.json" for i in range(4)),
                                                   "slow-a.json", "slow-b.json"]
    assert w.stop() == 0
    assert "Traceback" not in w.log() and " ERROR " not in w.log(), w.log()

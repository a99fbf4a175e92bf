"""Job work dirs: `work/<id>/` per job, and blank ones kept for the next job.

A job's work dir holds its scratch files and its stdout/stderr logs: three inodes before
the job runs a line. On ext4 without a journal every inode allocation scans past the
inodes freed in the last minutes, so those three can cost milliseconds. A job that ends
leaving its dir exactly as it found it (two empty logs, nothing else) gives it back: it
is moved to `work/.blank/` and the next job's dir is one of those, renamed into place.
Nothing of a job can reach a recycled dir: it is taken back only after the job has
ended for good (a retry keeps its dir) and after its PID namespace is empty.
"""

from __future__ import annotations

import itertools
import os
import shutil
import stat
from pathlib import Path

from worker import fsutil

LOGS = ("stderr.log", "stdout.log")  #: what a blank dir holds, sorted
BLANK_DIR = ".blank"
SCRATCH_PREFIX = ".spare-"  #: a spare's dir while it waits (`work/.spare-<n>`)


class Workdirs:
    """The work dirs under one `work/` root; only the supervisor moves or removes them."""

    def __init__(self, root: Path, uid: int | None, gid: int | None, keep: int = 64) -> None:
        self.root = root
        self.blank = root / BLANK_DIR
        self.uid, self.gid = uid, gid
        self.keep = keep
        self.free: list[str] = []  # names under .blank/
        self._names = itertools.count()

    def open(self) -> int:
        """Take stock at start: keep the clean blanks and spares' dirs, remove the rest.

        Returns how many blanks there are. No job runs yet, so nothing can be inside one.
        """
        self.blank.mkdir(mode=0o700, exist_ok=True)
        names = sorted(os.listdir(self.blank))
        self._names = itertools.count(max((int(n) for n in names if n.isdigit()), default=-1) + 1)
        for name in names:
            path = self.blank / name
            if name.isdigit() and _is_blank(path):
                self._own(path)
                self.free.append(name)
            else:
                shutil.rmtree(path, ignore_errors=True)
        for entry in os.scandir(self.root):
            if entry.name.startswith(SCRATCH_PREFIX) and entry.is_dir(follow_symlinks=False):
                self.recycle(Path(entry.path))
        return len(self.free)

    def path(self, job_id: str) -> Path:
        """The job's work dir (a blank moved there, or made by its child)."""
        return self.root / job_id

    def provide(self, dest: Path) -> bool:
        """Move a blank dir to `dest`; False when none is kept or `dest` exists (an earlier
        attempt's dir, which its next attempt keeps using)."""
        while self.free:
            name = self.free.pop()
            try:
                fsutil.rename_noreplace(self.blank / name, dest)
            except FileExistsError:
                self.free.append(name)
                return False
            except FileNotFoundError:  # removed behind our back: try the next one
                continue
            return True
        return False

    def recycle(self, path: Path) -> bool:
        """Keep `path` as a blank when it holds two empty logs and nothing else; else remove
        it if it is a spare's never-used dir. The caller vouches that no process of the job
        is left. True when it was kept."""
        if len(self.free) < self.keep and _is_blank(path):
            name = str(next(self._names))
            try:
                fsutil.rename_noreplace(path, self.blank / name)
            except OSError:
                return False
            self._own(self.blank / name)
            self.free.append(name)
            return True
        if path.name.startswith(SCRATCH_PREFIX):
            shutil.rmtree(path, ignore_errors=True)
        return False

    def _own(self, path: Path) -> None:
        """Modes back to what a fresh dir gets; owned by the job user (a setting may change)."""
        os.chmod(path, 0o700)
        for name in LOGS:
            os.chmod(path / name, 0o600)
        if self.uid is not None and self.gid is not None:
            for p in (path, path / LOGS[0], path / LOGS[1]):
                os.chown(p, self.uid, self.gid, follow_symlinks=False)


def _is_blank(path: Path) -> bool:
    """True for a real dir holding exactly two empty, singly linked logs and no xattrs."""
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_nlink != 2 or os.listxattr(path, follow_symlinks=False):
            return False
        if sorted(os.listdir(path)) != list(LOGS):
            return False
        for name in LOGS:
            log = os.lstat(path / name)
            if not stat.S_ISREG(log.st_mode) or log.st_size or log.st_nlink != 1:
                return False
            if os.listxattr(path / name, follow_symlinks=False):
                return False
    except OSError:
        return False
    return True

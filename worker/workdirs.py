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

import errno
import fcntl
import itertools
import os
import shutil
import stat
import struct
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
        """Modes and times back to what a fresh dir gets; owned by the job user (a setting may
        change)."""
        os.chmod(path, 0o700)
        for name in LOGS:
            os.chmod(path / name, 0o600)
            os.utime(path / name, follow_symlinks=False)
        os.utime(path, follow_symlinks=False)
        if self.uid is not None and self.gid is not None:
            for p in (path, path / LOGS[0], path / LOGS[1]):
                os.chown(p, self.uid, self.gid, follow_symlinks=False)


def _is_blank(path: Path) -> bool:
    """True for a real dir, never grown past one block, holding exactly two empty, singly
    linked logs with no blocks; none of the three with xattrs or inode flags a job may set."""
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_nlink != 2 or st.st_size > st.st_blksize:
            return False
        if sorted(os.listdir(path)) != list(LOGS) or not _plain(path, os.O_DIRECTORY):
            return False
        for name in LOGS:
            log = os.lstat(path / name)
            if not stat.S_ISREG(log.st_mode) or log.st_size or log.st_blocks \
                    or log.st_nlink != 1 or not _plain(path / name, 0):
                return False
    except OSError:
        return False
    return True


#: Inode flags the filesystem sets by itself (FS_IOC_GETFLAGS): extents, inline data, a
#: dir's hash index. Any other (sync, dirsync, noatime, nodump, nocow, ...) a job set.
_OWN_FLAGS = 0x00080000 | 0x10000000 | 0x00001000
_FS_IOC_GETFLAGS = 0x80086601


def _plain(path: Path, kind: int) -> bool:
    """No xattrs and no inode flags but the filesystem's own on `path` (not followed)."""
    if os.listxattr(path, follow_symlinks=False):
        return False
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | kind)
    try:
        got = fcntl.ioctl(fd, _FS_IOC_GETFLAGS, b"\0" * 4)
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
            return True  # a filesystem without inode flags
        raise
    finally:
        os.close(fd)
    return not struct.unpack("i", got)[0] & ~_OWN_FLAGS

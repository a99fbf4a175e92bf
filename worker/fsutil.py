"""Crash-safe file primitives: atomic write, no-replace publish, safe open with a size cap."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

from worker.errors import UnsafeFile

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the directory entries of `path` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tmp(path: Path, data: bytes, fsync: bool) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def write_atomic(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Replace `path` with `data` so that readers see the old or the new file, never a torn one."""
    tmp = _write_tmp(path, data, fsync)
    os.replace(tmp, path)
    if fsync:
        fsync_dir(path.parent)


def publish_noreplace(path: Path, data: bytes, *, fsync: bool = True, sync_dir: bool = True) -> bool:
    """Create `path` with `data` atomically unless it exists; return False when it already did.

    With `sync_dir` False the caller fsyncs the directory itself (to batch it).
    """
    tmp = _write_tmp(path, data, fsync)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    if fsync and sync_dir:
        fsync_dir(path.parent)
    return True


def open_regular(path: Path) -> tuple[int, os.stat_result]:
    """Open `path` for reading without following a symlink; raise UnsafeFile unless it is a regular file."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeFile("is a symbolic link; job files must be regular files") from e
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeFile(f"is a {_kind(st.st_mode)}, not a regular file")
    return fd, st


def has_writer(fd: int) -> bool:
    """True while some process still holds the file open for writing (a read lease is refused)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as e:
        # EAGAIN/EBUSY: open for writing. Anything else: leases unsupported, trust the event.
        return e.errno in (errno.EAGAIN, errno.EBUSY)
    fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    return False


def read_capped(fd: int, size: int, limit: int) -> bytes:
    """Read a whole file from `fd`; raise UnsafeFile when it is larger than `limit` bytes."""
    if size > limit:
        raise UnsafeFile(f"is {size} bytes, over the limit of {limit} bytes")
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > limit:
            raise UnsafeFile(f"grew past the limit of {limit} bytes while being read")
        chunks.append(chunk)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return "special file"


def makedirs(*paths: Path, mode: int = 0o755) -> None:
    """Create each directory (and parents) when missing."""
    for p in paths:
        p.mkdir(mode=mode, parents=True, exist_ok=True)

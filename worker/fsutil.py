"""Crash-safe file primitives: atomic write, no-replace publish, safe open with a size cap."""

from __future__ import annotations

import contextlib
import ctypes
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


def write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd`."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_tmp(path: Path, data: bytes, fsync: bool) -> Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        write_all(fd, data)
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


def publish_noreplace(tmp: Path, path: Path, *, fsync: bool = True) -> bool:
    """Put the written file `tmp` under `path` (fsync'd first) unless `path` exists; False
    when it existed. `tmp`'s own name is then gone, and stays on an error (for another try).
    The caller fsyncs the directory."""
    if fsync:
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        os.unlink(tmp)
        return False
    os.unlink(tmp)
    return True


def printable(name: str) -> str:
    """A file name as text any JSON or log line can hold: bytes that are not UTF-8 appear
    as \\xNN escapes."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def open_regular(path: str | Path) -> tuple[int, os.stat_result]:
    """Open `path` for reading without following a symlink; raise UnsafeFile unless it is a regular file."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeFile("is a symbolic link; job files must be regular files") from e
        with contextlib.suppress(OSError):  # a socket cannot be opened (ENXIO): say what it is
            if not stat.S_ISREG(mode := os.lstat(path).st_mode):
                raise UnsafeFile(f"is a {_kind(mode)}, not a regular file") from e
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeFile(f"is a {_kind(st.st_mode)}, not a regular file")
    return fd, st


def has_writer(fd: int) -> bool | None:
    """True while some process still holds the file open for writing (a read lease is
    refused), False when none does; None when no lease can tell: this process may not ask
    (a lease needs the file's owner or CAP_LEASE) or the filesystem has none."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as e:
        return True if e.errno in (errno.EAGAIN, errno.EBUSY) else None
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


def read_whole(path: str) -> bytes:
    """A whole file with plain syscalls: open() adds an fstat, an ioctl and two lseeks."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    chunks = []
    try:
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)


def makedirs(*paths: Path, mode: int = 0o755) -> None:
    """Create each directory (and parents) when missing."""
    for p in paths:
        p.mkdir(mode=mode, parents=True, exist_ok=True)


_libc = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD, _RENAME_NOREPLACE, _RENAME_EXCHANGE = -100, 1, 2


def exchange(a: str | Path, b: str | Path) -> None:
    """Swap two existing names atomically (renameat2 RENAME_EXCHANGE); OSError otherwise."""
    _renameat2(a, b, _RENAME_EXCHANGE)


def rename_noreplace(src: str | Path, dst: str | Path) -> None:
    """Rename `src` to `dst` unless `dst` exists (FileExistsError then, even for an empty dir).
    Where the filesystem lacks RENAME_NOREPLACE (NFS, some FUSE), `dst` is looked for first:
    only a process creating `dst` in between could then be replaced."""
    try:
        _renameat2(src, dst, _RENAME_NOREPLACE)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)


def _renameat2(a: str | Path, b: str | Path, flags: int) -> None:
    if _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(a), None, str(b))


class FilePool:
    """Atomic small-file writes in one directory that reuse the inodes of removed files.

    On ext4 without a journal a new inode is not placed where one was freed in the last
    minutes: each creation scans past every recently freed inode of its group, so creating
    and deleting a file per job makes every later creation on the filesystem slower. A
    removed file is parked (renamed) in a hidden subdirectory instead, and the next write
    renames it back in, so steady use creates and frees no inode. Not fsync'd.
    """

    def __init__(self, directory: Path, keep: int = 1024) -> None:
        self.dir = directory
        self.parked = directory / ".parked"
        self.keep = keep
        self.free: list[str] = []
        self._next = 0
        # per-file paths as strings: building a Path per write costs more than the syscalls
        self._dir, self._parked = os.fspath(directory), os.fspath(self.parked)

    def open(self) -> None:
        """Create the parking place; take back files parked, or left half-written, earlier."""
        self.parked.mkdir(mode=0o700, exist_ok=True)
        self.free = [n for n in os.listdir(self.parked) if n.isdigit()]
        self._next = max((int(n) for n in self.free), default=-1) + 1
        for name in os.listdir(self.dir):
            if name.startswith(".") and name.endswith(".tmp"):
                self._park(f"{self._dir}/{name}")

    def write(self, name: str, data: bytes) -> None:
        """Replace file `name` with `data` so that readers see the old or the new file, never
        a torn one."""
        path = f"{self._dir}/{name}"
        if not self.free:
            write_atomic(Path(path), data, fsync=False)
            return
        tmp = f"{self._dir}/.{name}.{os.getpid()}.tmp"
        try:
            os.rename(f"{self._parked}/{self.free.pop()}", tmp)
        except FileNotFoundError:  # removed behind our back: make a new one
            write_atomic(Path(path), data, fsync=False)
            return
        try:
            # Overwritten in place, then cut to length: truncating to zero would free its data
            # block and allocate another (on a filesystem mounted with `discard`, the free
            # waits for the device).
            fd = os.open(tmp, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.ftruncate(fd, len(data))
            finally:
                os.close(fd)
            try:
                exchange(tmp, path)  # the old file goes back to the pool instead of being freed
            except OSError as e:  # no old file, or a filesystem without RENAME_EXCHANGE
                if e.errno not in (errno.ENOENT, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                os.replace(tmp, path)
                return
        except BaseException:
            self._park(tmp)
            raise
        self._park(tmp)

    def remove(self, name: str) -> None:
        """Remove file `name` (gone already is fine), keeping its inode for a later write."""
        path = f"{self._dir}/{name}"
        if len(self.free) >= self.keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        self._park(path)

    def _park(self, path: str) -> None:
        name = str(self._next)
        try:
            os.rename(path, f"{self._parked}/{name}")
        except FileNotFoundError:
            return
        self._next += 1
        self.free.append(name)

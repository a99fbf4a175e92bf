"""Landlock (best effort by ABI): a job reads only what it is given and writes only its own dirs."""

from __future__ import annotations

import ctypes
import os
import stat
from collections.abc import Iterable

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall  # bound at import, in the zygote, not in every child
_SYS_CREATE_RULESET, _SYS_ADD_RULE, _SYS_RESTRICT_SELF = 444, 445, 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR, MAKE_REG = 1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 8
MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_FILE_ONLY = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
READ = EXECUTE | READ_FILE | READ_DIR


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def abi() -> int:
    """The Landlock ABI version of this kernel; 0 when Landlock is unavailable."""
    v = _syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0),
                 ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(int(v), 0)


def _handled(version: int) -> int:
    rights = (1 << 13) - 1
    if version >= 2:
        rights |= REFER
    if version >= 3:
        rights |= TRUNCATE
    if version >= 5:
        rights |= IOCTL_DEV
    return rights


def _check(rc: int, what: str) -> int:
    if rc < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"landlock {what}: {os.strerror(err)}")
    return rc


def restrict(read: Iterable[str], write: Iterable[str], version: int) -> None:
    """Allow read-only access below `read`, full access below `write`, nothing else; irreversible.

    Paths that do not exist are skipped. Requires NO_NEW_PRIVS (or CAP_SYS_ADMIN).
    """
    enforce(ruleset(read, write, version), [], version)


#: Read-only rules made once, in a zygote: path -> its rule (naming an O_PATH fd kept open).
_anchored: dict[str, _PathBeneath] = {}
_anchored_version = 0
_RULE_TYPE, _NO_FLAGS = ctypes.c_uint32(_RULE_PATH_BENEATH), ctypes.c_uint32(0)


def anchor(paths: Iterable[str], version: int) -> None:
    """Open `paths` once (O_PATH, kept open) and make their read-only rules, in a zygote: its
    children then add those rules to their rulesets without resolving each path again.

    A path is resolved when anchored: one replaced afterwards (not a path's contents, the
    path itself, as a venv made anew) keeps its old inode until the zygote restarts.
    Paths that cannot be opened are skipped, as `ruleset` skips them. Replaces earlier anchors.
    """
    global _anchored_version
    for rule in _anchored.values():
        os.close(rule.parent_fd)
    _anchored.clear()
    _anchored_version = version
    for path in paths:
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            continue
        _anchored[path] = _PathBeneath(_rights(fd, READ & _handled(version)), fd)


def ruleset(read: Iterable[str], write: Iterable[str], version: int,
            anchored: bool = False) -> int:
    """A ruleset fd allowing read-only access below `read` and full access below `write`, to be
    enforced later (a rule holds the path's inode: a dir renamed afterwards stays allowed).
    With `anchored`, read paths anchored for `version` (see `anchor`) are added from their
    fds: only in a zygote's child before it closes its inherited fds."""
    handled = _handled(version)
    attr = (ctypes.c_uint64 * 3)(handled, 0, 0)
    fd = _check(_syscall(_SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(8),
                         _NO_FLAGS), "create_ruleset")
    anchors = _anchored if anchored and version == _anchored_version else {}
    try:
        for path in read:
            if path in anchors:
                _add_rule(fd, anchors[path], path)
            else:
                _add(fd, path, READ & handled)
        for path in write:
            _add(fd, path, handled)
    except BaseException:
        os.close(fd)
        raise
    return fd


def enforce(fd: int, read: Iterable[str], version: int) -> None:
    """Add read-only access below `read` to ruleset `fd`, restrict this process to it; close it."""
    try:
        for path in read:
            _add(fd, path, READ & _handled(version))
        _check(_syscall(_SYS_RESTRICT_SELF, fd, _NO_FLAGS), "restrict_self")
    finally:
        os.close(fd)


def _add(ruleset: int, path: str, rights: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return
    try:
        _add_rule(ruleset, _PathBeneath(_rights(fd, rights), fd), path)
    finally:
        os.close(fd)


def _add_rule(ruleset: int, rule: _PathBeneath, path: str) -> None:
    _check(_syscall(_SYS_ADD_RULE, ruleset, _RULE_TYPE, ctypes.byref(rule), _NO_FLAGS),
           f"add_rule {path}")


def _rights(fd: int, rights: int) -> int:
    """`rights` as they may apply to what `fd` is: a file takes no directory rights."""
    return rights if stat.S_ISDIR(os.fstat(fd).st_mode) else rights & _FILE_ONLY

"""Signals wake the loop through a pipe and do nothing else; blocked around fork, reset in the child."""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]  # `signal` without its enum wrappers
import contextlib
import os
import signal
from collections.abc import Iterator
from types import FrameType

#: Signals the supervisor reacts to; their handlers only write to the wakeup pipe.
_SIG_DFL = int(signal.SIG_DFL)
HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD)


def _wake(signum: int, frame: FrameType | None) -> None:
    """Do nothing: set_wakeup_fd already wrote the signal number into the pipe."""


class SignalPipe:
    """The read end of the wakeup pipe; each byte read is a signal number."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for sig in HANDLED:
            signal.signal(sig, _wake)

    def fileno(self) -> int:
        """The fd to register with the selector."""
        return self.read_fd

    def drain(self) -> list[int]:
        """Return the signal numbers received since the last call, in order, duplicates folded."""
        seen: list[int] = []
        while True:
            try:
                chunk = os.read(self.read_fd, 512)
            except BlockingIOError:
                return seen
            if not chunk:
                return seen
            for num in chunk:
                if num not in seen:
                    seen.append(num)

    def close(self) -> None:
        """Restore default handling and close the pipe."""
        signal.set_wakeup_fd(-1)
        for sig in HANDLED:
            signal.signal(sig, signal.SIG_DFL)
        os.close(self.read_fd)
        os.close(self._write_fd)


#: What a child resets, as plain ints: `signal.signal` would build an enum of each old handler,
#: and every object a fresh child touches costs it a copy-on-write page fault.
_RESET = tuple(int(s) for s in (*HANDLED, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGUSR2,
                                signal.SIGALRM))
_HANDLED_INTS = tuple(int(s) for s in HANDLED)


def block() -> set[int]:
    """Block the handled signals (around a fork); return the mask to `restore`."""
    old: set[int] = _signal.pthread_sigmask(_signal.SIG_BLOCK, _HANDLED_INTS)
    return old


def restore(mask: set[int]) -> None:
    """Set the signal mask `block` returned."""
    _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)


@contextlib.contextmanager
def blocked() -> Iterator[None]:
    """Block the handled signals for the duration (around fork), then restore the mask."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def reset_in_child() -> None:
    """In a fresh child: detach from the wakeup pipe, default every disposition, unblock all."""
    _signal.set_wakeup_fd(-1)
    for sig in _RESET:
        _signal.signal(sig, _SIG_DFL)
    _signal.pthread_sigmask(_signal.SIG_SETMASK, ())

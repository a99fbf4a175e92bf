"""A full disk under the spool: whether space is short, and the results that wait for it."""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from collections.abc import Iterator
from typing import Any, Generic, TypeGuard, TypeVar

log = logging.getLogger("guestkit.shortage")

#: While space is short, held results are tried again this often (seconds).
RETRY_EVERY = 1.0
#: What a write says when the filesystem, or the writer's quota, is full.
SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

T = TypeVar("T")


def out_of_space(e: BaseException) -> TypeGuard[OSError]:
    """True for an error that says the disk, or the writer's quota, is full."""
    return isinstance(e, OSError) and e.errno in SPACE_ERRNOS


class NoRoom(Exception):
    """A write under the spool found no space while `doing` (other ENOSPC, e.g. a cgroup's,
    stay OSError)."""

    def __init__(self, doing: str, error: OSError) -> None:
        super().__init__(f"{doing}: {error}")
        self.doing = doing
        self.error = error


@contextlib.contextmanager
def room(doing: str) -> Iterator[None]:
    """Turn a lack of space in the block's spool writes into NoRoom(doing)."""
    try:
        yield
    except OSError as e:
        if out_of_space(e):
            raise NoRoom(doing, e) from e
        raise


class Shortage(Generic[T]):
    """Since when writes under the spool fail for lack of space, and the results (with
    what archives their jobs) held in memory meanwhile, oldest first."""

    def __init__(self) -> None:
        self.since: float | None = None  # monotonic; None while space is not short
        self.next_try = 0.0
        self.held: list[tuple[str, dict[str, Any], T]] = []
        self.held_ids: set[str] = set()  # the jobs of `held`: no other job may take their ids
        self.written = 0  # held results written since space was short

    @property
    def active(self) -> bool:
        """True from a write that failed for lack of space until one succeeds again."""
        return self.since is not None

    def began(self, doing: str, e: OSError) -> None:
        """A write failed for lack of space while `doing` (e.g. "writing the result of job
        x"): say so once; the held writes are tried again every RETRY_EVERY."""
        if self.since is not None:
            return
        self.since, self.written = time.monotonic(), 0
        self.next_try = self.since + RETRY_EVERY
        cause = f"{e.filename}: {e.strerror}" if e.filename else e.strerror
        log.error("no space left on the spool's disk while %s (%s); no job is taken or "
                  "started until there is space; running jobs go on, and their results wait in "
                  "memory until they can be written (tried every %.0f s)",
                  doing, cause, RETRY_EVERY)

    def noted(self, doing: str, e: OSError) -> bool:
        """Whether `e` says there is no space: then noted, as by `began`; else the caller
        raises it."""
        if not out_of_space(e):
            return False
        self.began(doing, e)
        return True

    def due(self, now: float) -> bool:
        """Whether it is time to try the held writes again (then not before RETRY_EVERY)."""
        if self.since is None or now < self.next_try:
            return False
        self.next_try = now + RETRY_EVERY
        return True

    def hold(self, job_id: str, doc: dict[str, Any], item: T) -> None:
        """Keep the result `doc` of `job_id` (and `item`, what archives its job) until it can
        be written, behind the others."""
        self.held.append((job_id, doc, item))
        self.held_ids.add(job_id)

    def release(self) -> None:
        """The oldest held result was written: forget it."""
        self.written += 1
        self.held_ids.discard(self.held.pop(0)[0])

    def ended(self) -> None:
        """Writes succeed again."""
        if self.since is None:
            return
        log.warning("space again after %.0f s: %d held result(s) written; jobs are taken and "
                    "started again", time.monotonic() - self.since, self.written)
        self.since = None

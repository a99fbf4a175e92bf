"""The at-fork hooks of `threading` and `logging`, which a single-threaded zygote's children skip.

Both modules register hooks that, in a forked child, reset the locks another thread may have
held at the fork. A zygote forks from its only thread and outside any logging call, so those
locks are free; yet running the hooks touches about 110 pages of the zygote's memory in every
child (copy-on-write faults, about 0.3 ms of CPU here). `defer` holds the hooks back while the
zygote imports; `settle` leaves them out while the process has one thread, and registers them
after all when it has more (a handler's `prepare()` may start threads). A job child registers
them (`restore`) before its handler runs, so that the job's own forks run them as usual.
"""

from __future__ import annotations

import os
from collections.abc import Callable

#: The modules whose at-fork hooks only reset locks that other threads could hold.
LOCK_RESETTERS = ("threading", "logging")

_register = os.register_at_fork
_held: list[dict[str, Callable[[], object]]] = []


def defer() -> None:
    """Hold back the at-fork hooks `threading` and `logging` register from now on (others pass)."""
    os.register_at_fork = _register_or_hold  # type: ignore[assignment]


def _register_or_hold(**hooks: Callable[[], object]) -> None:
    if any(getattr(f, "__module__", None) in LOCK_RESETTERS for f in hooks.values()):
        _held.append(hooks)
    else:
        _register(**hooks)


def settle() -> int:
    """Stop holding back; register what was held unless this process has one thread; return
    how many stay unregistered (its children skip them)."""
    os.register_at_fork = _register
    if threads() > 1:
        restore()
    return len(_held)


def restore() -> None:
    """Register the hooks held back (in a job child: so that its own forks run them)."""
    held = list(_held)
    _held.clear()
    for hooks in held:
        _register(**hooks)


def threads() -> int:
    """How many threads this process has (started by any means, not only `threading`)."""
    return len(os.listdir("/proc/self/task"))

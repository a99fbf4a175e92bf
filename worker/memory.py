"""The heap: what the garbage collector walks, and giving pages back once a large queue has
drained."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def trim() -> None:
    """Collect garbage and return free heap pages to the kernel (glibc malloc_trim); best effort."""
    gc.collect()
    trim_heap = getattr(_libc, "malloc_trim", None)
    if trim_heap is not None:
        trim_heap(0)


def freeze_startup() -> int:
    """Collect, then exempt every object alive now from later collections; return how many.

    For the supervisor: each full collection would otherwise walk the modules, settings and
    registry of start-up (19 ms seen, in the middle of some job's path). Not for a zygote:
    its children then took 25 more page faults each.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()

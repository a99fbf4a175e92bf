"""Giving the heap back to the system once a large queue has drained."""

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

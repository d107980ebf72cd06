"""Give freed C-heap memory back to the OS while large weights are being built and dropped."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc only; elsewhere nothing happens). Packing and fusing
    free many megabytes in pieces too small to be returned on their own, and new buffers are often larger than
    the holes, so without this the process keeps (and counts as peak memory) every piece it ever freed."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)

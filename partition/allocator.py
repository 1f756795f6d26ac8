"""Keep large frame buffers on the heap, where freed memory is reused.

glibc serves allocations above ``M_MMAP_THRESHOLD`` (at most 32 MB by default) with fresh
``mmap`` pages and unmaps them on free, so every large frame pays ~0.45 ms per MB in page
faults. Raising the threshold and the trim threshold lets a node reuse the same memory for
frame after frame (measured in ``benchmarks/runtime_overhead.py``). The profiler sets it
too, so that layers are timed with the allocation behaviour the workers have.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD_BYTES = 1 << 30


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, or None where it cannot be found."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


@functools.cache
def keep_large_buffers() -> bool:
    """Raise glibc's mmap and trim thresholds to 1 GiB; False where there is no glibc."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:  # not glibc (macOS, musl without mallopt)
        return False
    done = all(
        mallopt(option, _THRESHOLD_BYTES) == 1 for option in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD)
    )
    log.debug("large buffers kept on the heap: %s", done)
    return done


def release_free_memory() -> bool:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim(0)``).

    With the thresholds above, memory freed after a large refused upload or frame would stay
    in the process; a node calls this after such a refusal. False where there is no glibc.
    """
    malloc_trim = getattr(_libc(), "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim(0)
    return True

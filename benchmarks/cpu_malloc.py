"""Let glibc's malloc keep freed memory, so that CPU step times measure the ops and not page faults.

By default glibc serves every allocation above its mmap threshold (128 KiB,
rising to at most 32 MiB as large blocks are freed) with a fresh ``mmap`` and
returns it on free. torch's CPU allocator caches nothing, so a step then pays
a page fault per 4 KiB of most large tensors it makes: decoding a 441,000-value
4-bit copy took 0.76 ms that way and 0.21 ms with freed memory kept (one
thread). Raising ``M_MMAP_THRESHOLD`` to glibc's maximum and
``M_TRIM_THRESHOLD`` to 1 GiB makes freed memory reusable, as the
jemalloc/tcmalloc that CPU training guides recommend would. It is set for
every method of a run alike and changes no byte count: the benchmarks count
torch's own allocation events.
"""

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 << 20  # the largest glibc takes on 64-bit machines
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> str:
    """Set the two thresholds in this process; returns a line for the report saying what was set (or why not)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return "the system's malloc as it is (no glibc mallopt here)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return "the system's malloc as it is (mallopt refused the thresholds)"
    return (f"glibc malloc keeping freed memory (mallopt M_MMAP_THRESHOLD {MMAP_THRESHOLD >> 20} MiB, "
            f"M_TRIM_THRESHOLD {TRIM_THRESHOLD >> 30} GiB: benchmarks/cpu_malloc.py)")


def malloc_for_timing(system_malloc: bool) -> str:
    """``keep_freed_memory()``, unless the run asked for the system's malloc (``--system-malloc``); the report's line."""
    return "the system's malloc as it is (--system-malloc)" if system_malloc else keep_freed_memory()

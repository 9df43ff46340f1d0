"""Reuse of freed host memory by the process's C allocator, for large buffers on the CPU backend.

XLA's CPU client allocates every buffer with the C library's ``malloc``. glibc serves a request above its mmap
threshold (dynamic, at most 32 MiB) with a fresh mapping and unmaps it on ``free``, so every step that produces a
buffer over 32 MiB faults its whole size in again, the kernel zeroing each page first. On a 2-core EPYC VM, a jitted
``zeros([1e7]) + c`` (40 MB) took 15 ms that way against 1.8 ms when the memory is reused, and the MGDA step's
combination of 5 x 1e7 gradients alone 11.0 ms against 7.3 ms (``tools/bench_mgda.py`` times the whole step with
the memory kept, and with ``--fresh-pages`` the default way).

:func:`keep_freed_memory` raises both glibc thresholds (``mallopt``), so that large buffers come from the heap and
freed ones are reused, never unmapped: the process's resident size then stays at its peak, which a training process
reaches at its first step anyway. The trainer (:mod:`marble_jax.main`) calls it when JAX runs on the CPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's malloc.h
_M_MMAP_THRESHOLD = -3
KEEP_THRESHOLD = 2**31 - 1  # bytes: mallopt takes an int; larger single buffers still get their own mapping


@functools.cache
def keep_freed_memory() -> bool:
    """Makes glibc serve buffers below :data:`KEEP_THRESHOLD` from its heap and keep freed memory for reuse.

    Returns True where it took effect; False, with one logged line, where the C library is not glibc (musl,
    macOS, Windows: their allocators have no such thresholds) or refuses the values. Idempotent.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.info("keep_freed_memory: the C library (%s) has no mallopt; large buffers keep their own mappings", name)
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not (mallopt(_M_MMAP_THRESHOLD, KEEP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, KEEP_THRESHOLD)):
        log.info("keep_freed_memory: %s refused mallopt(M_MMAP_THRESHOLD / M_TRIM_THRESHOLD, %d)", name, KEEP_THRESHOLD)
        return False
    return True

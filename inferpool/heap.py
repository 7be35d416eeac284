"""The process heap: keeps the garbage collector's full passes off the request path,
and large buffers in the heap.

CPython's full collection walks every object it tracks, holding the GIL: every
thread of the process stops. After start-up a worker tracks ~217k objects (torch,
Celery, kombu; a full pass over them took 83-92 ms here), the API ~63k, and under load
a full pass comes every second or two as the objects of requests in flight get
promoted: at 64 misses in flight the API's took 15-40 ms each (1.6-4 ms once frozen;
throughput and p99 there did not move beyond the noise). Start-up objects live as
long as the process, so once it is ready they are frozen (gc.freeze, CPython's
permanent generation) and later passes walk only what was allocated since.

glibc's malloc serves each allocation over 128 KiB with a fresh mmap, and gives the
top of the heap back to the OS once 128 KiB of it is free; a bulk chunk (~800 KB), a
batch's activations (~6 MB) and every large gRPC message then fault their pages in
anew each time: page faults were ~10% of a worker's CPU on a bulk job. Both
thresholds are raised at start (keep_large_buffers), so such buffers are reused.
"""

from __future__ import annotations

import ctypes
import gc
import logging

log = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Call once start-up is over; returns how many objects were frozen."""
    gc.collect()  # start-up garbage is freed, not kept forever
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("froze %d start-up objects out of the garbage collector's full passes", frozen)
    return frozen


# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest
TRIM_THRESHOLD_BYTES = 256 << 20


def keep_large_buffers() -> bool:
    """Call at start; False where the C library has no mallopt (not glibc), and nothing
    changes. Buffers up to 32 MiB come from the heap, and up to 256 MiB of freed heap
    is kept for reuse rather than returned to the OS (RSS then stays at its peak)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    done = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    return mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and done

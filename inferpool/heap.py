"""Keeps the garbage collector's full passes off the request path.

CPython's full collection walks every object it tracks, holding the GIL: every
thread of the process stops. After start-up a worker tracks ~200k objects (torch,
Celery, kombu; a full pass took 83 ms here), the API fewer, and under load a full pass
comes every few seconds as the objects of requests in flight get promoted. Measured
at 64 misses in flight: pauses of up to 40 ms in the API and 124 ms in the worker,
the tail of every request caught behind one. Start-up objects live as long as the
process, so once it is ready they are frozen (gc.freeze, CPython's permanent
generation) and later passes walk only what was allocated since.
"""

from __future__ import annotations

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

"""Keeps the garbage collector's full passes off the request path.

CPython's full collection walks every object it tracks, holding the GIL: every
thread of the process stops. After start-up a worker tracks ~217k objects (torch,
Celery, kombu; a full pass over them took 83-92 ms here), the API ~63k, and under load
a full pass comes every second or two as the objects of requests in flight get
promoted: at 64 misses in flight the API's took 15-40 ms each (1.6-4 ms once frozen;
throughput and p99 there did not move beyond the noise). Start-up objects live as
long as the process, so once it is ready they are frozen (gc.freeze, CPython's
permanent generation) and later passes walk only what was allocated since.
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

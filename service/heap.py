"""The cyclic garbage collector in a long-running server.

Once torch, FastAPI, pydantic and gRPC are imported, the process holds ~400 000 Python objects that live as
long as it does (modules, classes, functions, their constants). CPython's oldest-generation collection walks
all of them holding the GIL, and meanwhile no request is parsed, no image decoded and no batch dispatched.
`gc.freeze()` moves every object alive at that moment to a permanent generation that collections skip.

It is called once, before the models load: the models' own objects stay in the collector's reach, so a
retired version's reference cycles are still freed after a reload, as without freezing. Frozen objects are
still freed by reference counting; what freezing could keep is only cyclic garbage made before the call,
and `freeze_startup_objects` collects that first.
"""
from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("rtmdet.service")


def freeze_startup_objects() -> int:
    """Collect, then freeze what is alive; returns how many objects are frozen."""
    t0 = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    # debug, not info: start-up writes nothing on stderr before the models load, so that a failed start stays
    # the one `rtmdet serve: error:` line (the count is on /metrics as rtmdet_gc_frozen_objects).
    log.debug("heap: %d start-up objects frozen out of the garbage collector's full passes (%.0f ms)", frozen,
              (time.perf_counter() - t0) * 1000)
    return frozen

"""glibc's malloc, set for inference: keep freed activation buffers for the next forward.

An RTMDet forward allocates and frees the same large activations every call (RTMDet-tiny at 640: ~5-10 MB each
at batch 1, ~40-80 MB at batch 8). glibc serves blocks over its mmap threshold with fresh `mmap`s and hands
memory above its trim threshold back to the kernel on free, so every forward page-faults its activations in
again. Here: every block from the one heap (`M_ARENA_MAX=1`: a thread's own arena lives in 64 MB mmapped heaps
these settings do not hold, and the service runs its forward on a batcher thread), never from `mmap`
(`M_MMAP_MAX=0`), and nothing trimmed below 1 GB. Measured (`bench/bench_allocator.py`, its table in the README;
`rtmdet serve` under `bench/bench_service.py`'s load in docs/service.md): the eager forward faults nothing after
the first calls and runs faster, and the server's 2.5 million minor faults in a 13 s window at 640 fell to 59,000.
ONNX Runtime and OpenVINO keep their own arenas.

The cost: the process keeps up to its peak working set after a forward instead of returning it (peak RSS about
the same: the README's table). Freeing a model version still calls `malloc_trim(0)` (service.registry),
which returns what is free. Process-wide, so only the commands that own their process call it (`rtmdet serve`,
`rtmdet detect`/`eval`, the benches); a library user of `Detector` may call it too.
"""
from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("rtmdet.allocator")

# mallopt parameters (glibc malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -3, -4, -8
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit); a larger value is refused
MMAP_MAX = 0  # and no mmap at all: batch-8 activations at 640 are 40-80 MB, over any threshold glibc takes
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20  # grow the heap in 64 MB steps: fewer brk calls while the first forwards find the peak
# One arena for every thread: a thread's own arena lives in 64 MB mmapped heaps that the thresholds above do not
# keep, and the service runs its forward on a batcher thread, not the main one.
ARENA_MAX = 1


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed blocks for reuse; False (nothing changed) where libc is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS, Windows: their allocators, left alone
        return False
    ok = all(mallopt(param, value) == 1 for param, value in
             ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD),
              (M_ARENA_MAX, ARENA_MAX), (M_MMAP_MAX, MMAP_MAX)))
    if not ok:
        log.warning("mallopt refused a setting; glibc keeps some of its defaults")
    return ok

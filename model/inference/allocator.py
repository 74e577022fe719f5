"""glibc's malloc, set for inference: keep freed activation buffers for the next forward.

An RTMDet forward allocates and frees the same large activations every call (RTMDet-tiny at 640: ~5-10 MB each
at batch 1, ~40-80 MB at batch 8). glibc serves blocks over its mmap threshold with fresh `mmap`s and hands
memory above its trim threshold back to the kernel on free, so every forward page-faults its activations in
again: measured here (eager, 1 thread, `bench/bench_allocator.py`, its table in the README) ~7,000 minor
faults per forward at batch 1 and 77,000-151,000 at batch 8; with the thresholds below, none after the first
forwards (blocks over 32 MB, glibc's ceiling for the mmap threshold, may still be mapped fresh), and the
forward 1.06-1.10x faster. ONNX Runtime and OpenVINO keep their own arenas and fault nothing.

The cost: the process keeps up to its peak working set after a forward instead of returning it (the same peak
RSS: 791 vs 796 MB at batch 1 here). Freeing a model version still calls `malloc_trim(0)` (service.registry),
which returns what is free. Process-wide, so only the commands that own their process call it (`rtmdet serve`,
`rtmdet detect`/`eval`, the benches); a library user of `Detector` may call it too.
"""
from __future__ import annotations

import ctypes
import logging

log = logging.getLogger("rtmdet.allocator")

# mallopt parameters (glibc malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit); a larger value is refused
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20  # grow the heap in 64 MB steps: fewer brk calls while the first forwards find the peak


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed blocks for reuse; False (nothing changed) where libc is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS, Windows: their allocators, left alone
        return False
    ok = all(mallopt(param, value) == 1 for param, value in
             ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
    if not ok:
        log.warning("mallopt refused a setting; glibc keeps some of its defaults")
    return ok

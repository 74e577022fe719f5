"""Streams: a batch cut into chunks that run at once, each on its share of the cores, instead of one batch on all.

With N intra-op threads, every layer of one batch ends at a barrier where the N threads wait for the slowest.
On a shared machine, and in the service, where decode threads and the event loop take a core now and then,
one late thread stalls all the others at every layer (PASSIVE OpenMP workers also sleep and wake around every
small operator). Chunks on one-thread streams share no barrier: a stream that loses its core for a moment delays
its own chunk only. ONNX Runtime and OpenVINO have this built in (one-thread sessions; `NUM_STREAMS`), used by
`model.inference.onnx_runners`; `TorchStreams` does the same for the torch engines (eager, inductor), whose
module is shared by the streams (no copy of the weights). With fewer images than threads, each chunk gets an
equal share of the threads (16 threads, a batch of 2: two chunks of 8 threads), so no core sits idle.

Measured on the 2-core Zen 4 VM, RTMDet-tiny, batch 8, 2 threads, `OMP_WAIT_POLICY=PASSIVE`, 5 alternating
rounds (a `/tmp` script, 2026-12-07): at 640 eager 7.46 -> 8.93 img/s (1.20x), inductor 8.42 -> 9.85 (1.17x);
at 320 eager 29.6 -> 34.4 (1.16x), inductor 33.6 -> 36.9 (1.10x). A batch of one still runs on all the
threads, in the caller's thread.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

STREAM_TIMEOUT_S = 600.0  # one chunk's inference; far beyond any here (RTMDet-x, a 640 batch of 8: ~30 s)


def chunk_sizes(batch: int, streams: int) -> list[int]:
    """How a batch is cut over the streams: as evenly as it goes, bigger chunks first (7 over 2: [4, 3])."""
    n = max(1, min(batch, streams))
    return [batch // n + (1 if i < batch % n else 0) for i in range(n)]


def chunk_slices(batch: int, streams: int) -> list[slice]:
    """`chunk_sizes` as the slices of the batch axis they cover."""
    out, start = [], 0
    for size in chunk_sizes(batch, streams):
        out.append(slice(start, start + size))
        start += size
    return out


def filled_stream_slices(batch: int, streams: int) -> list[slice]:
    """How a runner of fixed-thread sessions (ONNX Runtime, OpenVINO) cuts a batch: over its streams once the batch
    has an image for every stream, else whole, on the session with all the threads. Such a runner cannot give a
    stream more threads for one batch (`TorchStreams` can): 16 one-thread streams would run a batch of 2 on 2 of
    16 cores, so a batch that cannot fill them runs like a batch of one."""
    return chunk_slices(batch, streams) if batch >= streams else [slice(0, batch)]


def stream_count(threads: int, streams: int | None) -> int:
    """Streams a runner keeps: one per thread unless fewer are asked for."""
    return max(1, threads if streams is None else min(streams, threads))


class TorchStreams:
    """A torch engine (uint8 batch -> (cls list, second list)) run over `streams` workers: a batch of two or more
    is cut into up to that many chunks (`chunk_slices`), each run by `engine` on its own worker with an equal
    share of the `threads` (one each when there are as many chunks as threads), the outputs joined in batch
    order; a batch of one runs on the caller's thread with its threads.

    The first batch of a new chunk shape runs its chunks one after the other: the engine may compile for it
    (inductor), and its compilation patches process-wide settings that two threads must not enter at once."""

    # Two callers may run batches at once (the service's batcher does, at full load): their chunks queue for the same
    # workers, so a worker that finishes its chunk of one batch takes the next batch's at once.
    overlapping_calls = True

    def __init__(self, engine: Callable, threads: int, streams: int | None = None) -> None:
        self.engine = engine
        self.name = getattr(engine, "name", type(engine).__name__)
        self.threads = threads
        self.streams = stream_count(threads, streams)
        self._seen: set[int] = set()  # chunk sizes already run once
        self._first_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(self.streams, thread_name_prefix="torch-stream")

    def _chunk(self, x: torch.Tensor, threads: int):
        """One chunk on a worker, with `threads` threads; also whether it had to set them."""
        # get_num_threads before any set: a thread's first parallel call sets its OpenMP thread count from torch's
        # process-wide value (this get is that call), which would otherwise undo the set below.
        changed = torch.get_num_threads() != threads
        if changed:
            torch.set_num_threads(threads)
        return self.engine(x), changed

    def __call__(self, batch_uint8: torch.Tensor):
        chunks = chunk_slices(int(batch_uint8.shape[0]), self.streams)
        if len(chunks) == 1:
            return self.engine(batch_uint8)
        share = max(1, self.threads // len(chunks))
        sizes = {c.stop - c.start for c in chunks}
        if not sizes <= self._seen:
            with self._first_lock:
                done = [self.pool.submit(self._chunk, batch_uint8[c], share).result(timeout=STREAM_TIMEOUT_S)
                        for c in chunks]
                self._seen |= sizes
        else:
            futures = [self.pool.submit(self._chunk, batch_uint8[c], share) for c in chunks]
            done = [f.result(timeout=STREAM_TIMEOUT_S) for f in futures]
        if any(changed for _, changed in done):
            # A worker's set_num_threads also set torch's process-wide count, which threads started later take at
            # their first parallel call (e.g. the service's model thread): back to this runner's.
            torch.set_num_threads(self.threads)
        parts = [out for out, _ in done]
        return tuple([torch.cat(level) for level in zip(*(part[i] for part in parts), strict=True)]
                     for i in range(len(parts[0])))

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def with_streams(engine: Callable, threads: int, streams: int | None = None) -> Callable:
    """`engine` over streams when there are two or more threads to share out, else `engine` itself."""
    return TorchStreams(engine, threads, streams) if stream_count(threads, streams) > 1 else engine

"""Training DataLoader: pipeline-applying dataset, batch collation, per-worker seeding, DDP sampling.

Each worker process holds its own copy of the pipeline and therefore its own Mosaic/MixUp caches (as in
MMDetection); a worker re-seeds its copy from (seed, rank, worker id) so workers and ranks draw different
augmentations while a run stays reproducible for a seed.

Workers are started from a `forkserver`, never forked from the trainer. By the time a loader starts (at the
first epoch, and again at the stage switch) the trainer has threads: OpenCV's pool after a validation's
letterbox, OpenMP's after any tensor op, OpenBLAS's from numpy's import, gloo's under DDP, TensorBoard's writer.
A fork copies their locks but not the threads that hold them, so a child that touches such a lock (as
`cv2.setNumThreads` does) can wait for ever: the stage-switch hang of issue 12, which a parent doing OpenCV work
before forking reproduces within a few dozen starts. The forkserver is a fresh interpreter, started by exec,
that imports this module (torch, OpenCV, numpy) once and then only forks: it never runs a tensor op or an OpenCV
call, and it is started with OpenBLAS limited to the calling thread, so it stays single-threaded (a test checks
its thread count) and a fork from it copies no lock that another thread could hold. Preloading keeps a worker's
start to a fork plus unpickling its copy of the dataset, instead of re-importing torch in every worker (which
`spawn`, or a bare forkserver, costs: about 1.5 s per worker here).

As with `spawn`, the main module is imported again in each worker: a script that builds loaders needs the
`if __name__ == "__main__":` guard.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import threading
from collections.abc import Callable, Iterator, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from model.data.pipelines import build_train_pipeline
from model.data.sample import Sample
from model.data.transforms import PAD_VALUE

# A batch normally takes well under a second per worker; minutes without one means a worker is stuck (or far
# too slow to be useful), and an error that names it beats a run that waits for ever.
DEFAULT_LOADER_TIMEOUT_S = 300.0


# What the forkserver imports before it forks anything: everything a worker needs to unpickle a COCO dataset
# and run the pipelines, so a worker start is a fork and an unpickle.
_FORKSERVER_PRELOAD = ["model.data.loader", "model.data.coco"]


def worker_context() -> multiprocessing.context.BaseContext:
    """The start method for data-loader workers: a single-threaded forkserver (see the module docstring)."""
    ctx = multiprocessing.get_context("forkserver")
    with _forkserver_lock:
        # (Re)starts the server if it is not running; the preload list is read at the server's start only.
        ctx.set_forkserver_preload(_FORKSERVER_PRELOAD)
        # OpenBLAS starts a thread pool when numpy is imported unless told to use one thread; the server
        # process (and the workers forked from it, which are the parallelism anyway) must not have one.
        # Only the server's environment needs it, so it is set just around the server's start.
        saved = os.environ.get("OPENBLAS_NUM_THREADS")
        os.environ["OPENBLAS_NUM_THREADS"] = "1"
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            if saved is None:
                del os.environ["OPENBLAS_NUM_THREADS"]
            else:
                os.environ["OPENBLAS_NUM_THREADS"] = saved
    return ctx


def forkserver_pid() -> int | None:
    """The pid of this process's forkserver, once started (for tests and diagnostics)."""
    return getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)


_forkserver_lock = threading.Lock()


class DataLoaderStalled(RuntimeError):
    """No batch arrived from the data-loader workers within the loader's timeout."""


class TrainDataset(Dataset):
    """`dataset[i]` (a Sample, e.g. from CocoDetection) passed through `pipeline`."""

    def __init__(self, dataset: Sequence[Sample], pipeline: Callable[[Sample], Sample]):
        self.dataset = dataset
        self.pipeline = pipeline

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Sample:
        return self.pipeline(self.dataset[index])


def collate(samples: Sequence[Sample]) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Stack images into a uint8 B x H x W x 3 BGR tensor (padded bottom/right with 114 if sizes differ) and
    return per-image float32 (Ni, 4) xyxy boxes and int64 (Ni,) labels."""
    h = max(s.img.shape[0] for s in samples)
    w = max(s.img.shape[1] for s in samples)
    imgs = np.full((len(samples), h, w, 3), PAD_VALUE, np.uint8)
    for i, s in enumerate(samples):
        imgs[i, : s.img.shape[0], : s.img.shape[1]] = s.img
    boxes = [torch.from_numpy(np.ascontiguousarray(s.boxes, np.float32).reshape(-1, 4)) for s in samples]
    labels = [torch.from_numpy(np.ascontiguousarray(s.labels, np.int64).reshape(-1)) for s in samples]
    return torch.from_numpy(imgs), boxes, labels


class WorkerSeeder:
    """`worker_init_fn`: re-seed the worker's pipeline copy from (seed, rank, stage, worker id); one OpenCV thread."""

    def __init__(self, seed: int, rank: int, stage: int):
        self.seed = seed
        self.rank = rank
        self.stage = stage

    def __call__(self, worker_id: int) -> None:
        cv2.setNumThreads(1)  # workers are the parallelism; nested OpenCV threads only oversubscribe cores
        info = torch.utils.data.get_worker_info()
        pipeline = getattr(info.dataset, "pipeline", None)
        if hasattr(pipeline, "reseed"):
            pipeline.reseed([self.seed, self.rank, self.stage, worker_id])


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def build_train_loader(dataset: Sequence[Sample], size: str, img_size: int, batch_size: int, workers: int,
                       stage: int, distributed: bool, seed: int, drop_last: bool = False,
                       timeout_s: float = DEFAULT_LOADER_TIMEOUT_S) -> DataLoader:
    """A DataLoader of `collate` batches over `dataset` augmented with the stage-`stage` pipeline.

    With `distributed`, a DistributedSampler shards the data (call `loader.sampler.set_epoch(epoch)` every
    epoch); otherwise a seeded RandomSampler shuffles. Workers persist across epochs (and so do their caches);
    to switch stage, build a new loader. Memory is pinned when CUDA is available. Workers come from
    `worker_context()`; iterate with `batches()` so that a batch that takes longer than `timeout_s` becomes a
    `DataLoaderStalled` naming the stage and the worker.
    """
    rank, world = _rank_and_world() if distributed else (0, 1)
    pipeline = build_train_pipeline(size, img_size, stage, seed=[seed, rank, stage])
    train_set = TrainDataset(dataset, pipeline)
    if distributed:
        sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    else:
        sampler = RandomSampler(train_set, generator=torch.Generator().manual_seed(seed))
    return DataLoader(
        train_set,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=workers > 0,
        worker_init_fn=WorkerSeeder(seed, rank, stage) if workers > 0 else None,
        prefetch_factor=2 if workers > 0 else None,
        multiprocessing_context=worker_context() if workers > 0 else None,
        timeout=timeout_s if workers > 0 else 0,
    )


def batches(loader: DataLoader, stage: int) -> Iterator:
    """Iterate `loader`, turning torch's bare "DataLoader timed out" into a `DataLoaderStalled` that names the
    stage, the worker whose batch is late (index and pid) and the timeout."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except RuntimeError as e:
            if not str(e).startswith("DataLoader timed out"):
                raise
            raise DataLoaderStalled(f"stage-{stage} data loader: {_late_worker(it)} sent no batch in "
                                    f"{loader.timeout:g} s") from e
        yield batch


def _late_worker(it) -> str:
    # torch keeps, per outstanding batch index, the worker it was sent to; these are private attributes, so
    # fall back to a plain description if a torch release renames them.
    try:
        worker_id = it._task_info[it._rcvd_idx][0]
        return f"worker {worker_id} (pid {it._workers[worker_id].pid})"
    except (AttributeError, KeyError, IndexError, TypeError):
        return "a worker"

"""Training DataLoader: pipeline-applying dataset, batch collation, per-worker seeding, DDP sampling.

Each worker process holds its own copy of the pipeline and therefore its own Mosaic/MixUp caches (as in
MMDetection); a worker re-seeds its copy from (seed, rank, worker id) so workers and ranks draw different
augmentations while a run stays reproducible for a seed.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from model.data.pipelines import build_train_pipeline
from model.data.sample import Sample
from model.data.transforms import PAD_VALUE


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
                       stage: int, distributed: bool, seed: int, drop_last: bool = False) -> DataLoader:
    """A DataLoader of `collate` batches over `dataset` augmented with the stage-`stage` pipeline.

    With `distributed`, a DistributedSampler shards the data (call `loader.sampler.set_epoch(epoch)` every
    epoch); otherwise a seeded RandomSampler shuffles. Workers persist across epochs (and so do their caches);
    to switch stage, build a new loader. Memory is pinned when CUDA is available.
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
    )

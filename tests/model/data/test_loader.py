"""TrainDataset / collate / build_train_loader: batch format, per-worker seeding and caches, DDP sampler."""
from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from torch.utils.data import DistributedSampler

from model.data.loader import TrainDataset, build_train_loader, collate
from model.data.pipelines import build_train_pipeline
from model.data.sample import Sample
from tests.model.data.painted import painted_sample


def _dataset(n=16, same=False):
    # Image i has one box labelled i % 5, so a sample holding several labels was mixed from several images.
    return [painted_sample(60, 80, [(10 + (0 if same else i), 10, 50, 45)], [0 if same else i % 5], image_id=i)
            for i in range(n)]


def test_collate_stacks_uint8_bgr_and_pads_with_114():
    a = Sample(np.zeros((4, 6, 3), np.uint8), np.array([[0, 0, 2, 2]], np.float32), np.array([3]))
    b = Sample(np.ones((5, 3, 3), np.uint8))
    imgs, boxes, labels = collate([a, b])
    assert imgs.dtype == torch.uint8 and imgs.shape == (2, 5, 6, 3)
    assert (imgs[0, 4] == 114).all() and (imgs[1, :, 3:] == 114).all() and (imgs[1, :5, :3] == 1).all()
    assert boxes[0].dtype == torch.float32 and boxes[0].shape == (1, 4) and boxes[1].shape == (0, 4)
    assert labels[0].dtype == torch.int64 and labels[0].tolist() == [3] and labels[1].shape == (0,)


def test_train_dataset_applies_the_pipeline():
    ds = TrainDataset(_dataset(), build_train_pipeline("tiny", img_size=64, stage=2, seed=0))
    assert len(ds) == 16
    s = ds[3]
    assert s.img.shape == (64, 64, 3) and s.image_id == 3


def test_loader_batches_and_is_reproducible_for_a_seed():
    def first_batches(seed):
        loader = build_train_loader(_dataset(), "tiny", 64, batch_size=4, workers=0, stage=2, distributed=False,
                                    seed=seed)
        return [b for b, _ in zip(loader, range(2), strict=False)]

    a, b, c = first_batches(1), first_batches(1), first_batches(2)
    imgs, boxes, labels = a[0]
    assert imgs.shape == (4, 64, 64, 3) and imgs.dtype == torch.uint8
    assert len(boxes) == len(labels) == 4
    for (ia, ba, _), (ib, bb, _) in zip(a, b, strict=True):
        assert torch.equal(ia, ib) and all(torch.equal(x, y) for x, y in zip(ba, bb, strict=True))
    assert not torch.equal(a[0][0], c[0][0])


def test_workers_draw_different_augmentations_and_keep_their_own_cache():
    # Every index returns the same image: batches differ only if the two workers' RNGs differ.
    loader = build_train_loader(_dataset(8, same=True), "s", 64, batch_size=1, workers=2, stage=2,
                                distributed=False, seed=0)
    assert loader.persistent_workers and loader.num_workers == 2
    batches = [imgs for imgs, _, _ in loader]
    assert not all(torch.equal(batches[0], b) for b in batches[1:3])

    loader = build_train_loader(_dataset(24), "s", 64, batch_size=4, workers=2, stage=1, distributed=False, seed=0)
    mixed = 0
    for _, _, labels in loader:
        mixed += sum(len(set(lab.tolist())) > 1 for lab in labels)
    assert mixed > 0  # Mosaic/MixUp happened in the workers, from the workers' caches ...
    mosaic = loader.dataset.pipeline.transforms[0]
    assert len(mosaic.cache) == 0  # ... while the main process's copy never cached anything


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_loader_uses_a_distributed_sampler():
    if not torch.distributed.is_available():
        pytest.fail("torch.distributed is required")
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                                         world_size=1)
    try:
        loader = build_train_loader(_dataset(10), "tiny", 64, batch_size=5, workers=0, stage=2, distributed=True,
                                    seed=3)
        assert isinstance(loader.sampler, DistributedSampler)
        loader.sampler.set_epoch(0)
        order0 = list(iter(loader.sampler))
        loader.sampler.set_epoch(1)
        order1 = list(iter(loader.sampler))
        assert sorted(order0) == list(range(10)) and order0 != order1
        assert sum(len(b[1]) for b in loader) == 10
    finally:
        torch.distributed.destroy_process_group()

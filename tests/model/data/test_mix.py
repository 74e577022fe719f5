"""Mosaic and MixUp: box bookkeeping, cache size and pop policy, pass-through rules, per-size settings."""
from __future__ import annotations

import numpy as np
import pytest

from model.data.mix import CachedMixUp, CachedMosaic, SampleCache, mixup, mosaic
from model.data.pipelines import build_train_pipeline
from model.data.sample import Sample
from tests.model.data.painted import assert_boxes_cover_their_pixels, painted_sample


def _four_samples():
    return [
        painted_sample(60, 80, [(5, 5, 30, 30), (40, 20, 75, 55)], [0, 1], image_id=1),
        painted_sample(100, 50, [(10, 10, 40, 90)], [2], image_id=2),
        painted_sample(40, 40, [(0, 0, 20, 20), (25, 25, 40, 40)], [3, 4], image_id=3),
        painted_sample(70, 90, [(30, 10, 85, 60)], [5], image_id=4),
    ]


@pytest.mark.parametrize("center", [(64, 64), (32, 32), (96, 96), (40, 90), (95, 33)])
def test_mosaic_boxes_cover_their_pixels(center):
    out = mosaic(_four_samples(), img_scale=64, center=center)
    assert out.img.shape == (128, 128, 3)
    assert out.image_id == 1
    assert_boxes_cover_their_pixels(out)


def test_mosaic_places_top_left_image_ending_at_the_centre():
    s = painted_sample(64, 64, [(0, 0, 64, 64)], [0])
    out = mosaic([s, *_four_samples()[1:]], img_scale=64, center=(70, 80))
    np.testing.assert_array_equal(out.boxes[0], [6, 16, 70, 80])


@pytest.mark.parametrize("seed", range(5))
def test_mixup_keeps_both_images_boxes(seed):
    rng = np.random.default_rng(seed)
    dest = painted_sample(64, 64, [(4, 4, 20, 20)], [6])
    src = painted_sample(50, 90, [(10, 5, 40, 30), (50, 20, 85, 45)], [0, 1])
    jitter, flip = 1.0, bool(seed % 2)
    out = mixup(dest, src, img_scale=64, jitter=jitter, flip=flip, offset_rng=rng)
    assert out.img.shape == dest.img.shape
    assert sorted(out.labels.tolist()) == [0, 1, 6]
    # The blend is 0.5*dest + 0.5*patch, so the partner's pixels are 2*out - dest (up to truncation).
    patch = np.clip(2 * out.img.astype(np.int16) - dest.img, 0, 255).astype(np.uint8)
    from_src = out.labels != 6
    assert_boxes_cover_their_pixels(Sample(patch, out.boxes[from_src], out.labels[from_src]))
    assert_boxes_cover_their_pixels(Sample(dest.img, out.boxes[~from_src], out.labels[~from_src]))


def test_cache_pop_oldest_keeps_the_newest_in_order():
    cache = SampleCache(3, random_pop=False, rng=np.random.default_rng(0))
    for i in range(10):
        cache.push(Sample(np.zeros((1, 1, 3), np.uint8), image_id=i))
        assert len(cache) == min(i + 1, 3)
    assert [s.image_id for s in cache.items] == [7, 8, 9]


def test_cache_random_pop_keeps_size_and_pops_a_uniformly_random_entry():
    cache = SampleCache(5, random_pop=True, rng=np.random.default_rng(0))
    newest_popped, oldest_survived = 0, 0
    for i in range(600):
        cache.push(Sample(np.zeros((1, 1, 3), np.uint8), image_id=i))
        assert len(cache) == min(i + 1, 5)
        ids = [s.image_id for s in cache.items]
        assert ids == sorted(ids)  # arrival order is kept; only which one leaves is random
        if i >= 5:
            newest_popped += ids[-1] != i
            oldest_survived += ids[0] <= i - 5
    # Each of the 6 entries leaves with probability 1/6 on overflow: the new one ~100 times in 595.
    assert 60 < newest_popped < 140
    assert oldest_survived > 100  # with pop-oldest this would be 0


def test_cached_mosaic_passes_through_until_cache_holds_five():
    t = CachedMosaic(img_scale=32, max_cached_images=20, random_pop=False, rng=np.random.default_rng(0))
    samples = [painted_sample(40, 40, [(5, 5, 20, 20)], [i % 7], image_id=i) for i in range(6)]
    for s in samples[:4]:
        assert t(s) is s
    out = t(samples[4])
    assert out.img.shape == (64, 64, 3)
    assert len(t.cache) == 5


def test_cached_mixup_passes_through_on_the_first_sample_and_mixes_after():
    t = CachedMixUp(img_scale=40, max_cached_images=10, random_pop=False, prob=1.0, rng=np.random.default_rng(0))
    a = painted_sample(40, 40, [(5, 5, 20, 20)], [0], image_id=1)
    b = painted_sample(40, 40, [(22, 22, 38, 38)], [1], image_id=2)
    assert t(a) is a
    out = t(b)
    assert out is not b and len(out.labels) >= 1


def test_cached_mixup_probability():
    t = CachedMixUp(img_scale=16, max_cached_images=10, random_pop=False, prob=0.5, rng=np.random.default_rng(1))
    s = painted_sample(16, 16, [(2, 2, 10, 10)], [0])
    t(s)
    mixed = sum(t(s) is not s for _ in range(400))
    assert 160 < mixed < 240


def test_cached_mosaic_output_keeps_boxes_on_their_pixels():
    t = CachedMosaic(img_scale=48, max_cached_images=6, random_pop=True, rng=np.random.default_rng(3))
    for i in range(12):
        out = t(painted_sample(50, 60, [(10, 12, 40, 44)], [i % 7], image_id=i))
        if i >= 4:
            assert out.img.shape == (96, 96, 3)
            assert_boxes_cover_their_pixels(out)


@pytest.mark.parametrize(("size", "mosaic_cache", "mosaic_random", "mixup_cache", "mixup_random", "mixup_prob"), [
    ("tiny", 20, False, 10, False, 0.5),
    ("s", 40, True, 20, True, 1.0),
    ("m", 40, True, 20, True, 1.0),
    ("x", 40, True, 20, True, 1.0),
])
def test_official_cache_settings_per_size(size, mosaic_cache, mosaic_random, mixup_cache, mixup_random, mixup_prob):
    pipeline = build_train_pipeline(size, img_size=64, stage=1, seed=0)
    mos = next(t for t in pipeline.transforms if isinstance(t, CachedMosaic))
    mix = next(t for t in pipeline.transforms if isinstance(t, CachedMixUp))
    assert (mos.cache.max_size, mos.cache.random_pop) == (mosaic_cache, mosaic_random)
    assert (mix.cache.max_size, mix.cache.random_pop, mix.prob) == (mixup_cache, mixup_random, mixup_prob)
    assert [type(t).__name__ for t in pipeline.transforms] == [
        "CachedMosaic", "RandomResize", "RandomCrop", "YOLOXHSVRandomAug", "RandomFlip", "Pad", "CachedMixUp",
        "FilterDegenerate"]
    resize = pipeline.transforms[1]
    assert resize.scale == 128  # 1280 at 640, scaled to 64
    assert resize.ratio_range == ((0.5, 2.0) if size in ("tiny", "s") else (0.1, 2.0))


def test_stage2_pipeline_has_no_mixing_and_resizes_to_img_size():
    pipeline = build_train_pipeline("tiny", img_size=320, stage=2)
    names = [type(t).__name__ for t in pipeline.transforms]
    assert names == ["RandomResize", "RandomCrop", "YOLOXHSVRandomAug", "RandomFlip", "Pad", "FilterDegenerate"]
    assert pipeline.transforms[0].scale == 320 and pipeline.transforms[1].crop_size == 320


def test_strong_pipeline_output_shape_and_boxes_valid():
    pipeline = build_train_pipeline("tiny", img_size=64, stage=1, seed=0)
    rng = np.random.default_rng(0)
    for i in range(30):
        x, y = rng.integers(0, 40, 2)
        out = pipeline(painted_sample(70, 60, [(x, y, x + 18, y + 25)], [i % 7], image_id=i))
        assert out.img.shape == (64, 64, 3) and out.img.dtype == np.uint8
        b = out.boxes
        assert b.dtype == np.float32 and out.labels.dtype == np.int64 and len(b) == len(out.labels)
        assert (b[:, 0] >= 0).all() and (b[:, 2] <= 64).all() and (b[:, 1] >= 0).all() and (b[:, 3] <= 64).all()
        assert ((b[:, 2] - b[:, 0]) > 1).all() and ((b[:, 3] - b[:, 1]) > 1).all()

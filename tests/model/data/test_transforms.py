"""Box bookkeeping of every single-image transform: boxes still cover the pixels of their colour."""
from __future__ import annotations

import numpy as np
import pytest

from model.data.pipelines import build_train_pipeline
from model.data.transforms import (
    Compose,
    FilterDegenerate,
    Pad,
    RandomCrop,
    RandomFlip,
    RandomResize,
    YOLOXHSVRandomAug,
)
from tests.model.data.painted import assert_boxes_cover_their_pixels, painted_sample

SEEDS = range(6)


def _sample():
    # Non-touching boxes of different sizes, one at the image border, on a non-square image.
    return painted_sample(90, 130, [(5, 10, 45, 50), (60, 5, 70, 80), (80, 60, 130, 90), (100, 8, 118, 20)],
                          [0, 1, 2, 3])


def test_painted_check_fails_when_a_box_is_wrong():
    s = _sample()
    moved = s.replace(boxes=s.boxes + np.array([6, 0, 6, 0], np.float32))
    with pytest.raises(AssertionError):
        assert_boxes_cover_their_pixels(moved)
    assert_boxes_cover_their_pixels(s)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_resize_scales_boxes_with_the_image(seed):
    t = RandomResize(200, (0.5, 2.0), rng=np.random.default_rng(seed))
    out = t(_sample())
    h, w = out.img.shape[:2]
    assert max(h, w) in range(99, 401) and abs(w / h - 130 / 90) < 0.05
    assert_boxes_cover_their_pixels(out)


def test_random_resize_keeps_ratio_and_fits_target():
    t = RandomResize(100, (1.0, 1.0))
    out = t(_sample())  # 130x90 -> fit 100: scale = min(100/130, 100/90)
    assert out.img.shape[:2] == (int(90 * 100 / 130 + 0.5), 100)
    np.testing.assert_allclose(out.boxes[0], np.array([5, 10, 45, 50]) * np.array([100 / 130, 69 / 90] * 2),
                               rtol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_crop_shifts_clips_and_drops_boxes(seed):
    s = _sample()
    out = RandomCrop(64, rng=np.random.default_rng(seed))(s)
    assert out.img.shape[:2] == (64, 64)
    assert len(out.boxes) >= 1  # the crop is re-drawn until a box survives
    assert_boxes_cover_their_pixels(out)


def test_random_crop_of_a_small_image_keeps_it_whole():
    s = _sample()
    out = RandomCrop(200)(s)
    assert out.img.shape == s.img.shape
    np.testing.assert_array_equal(out.boxes, s.boxes)


@pytest.mark.parametrize("seed", SEEDS)
def test_flip_mirrors_boxes(seed):
    out = RandomFlip(0.5, rng=np.random.default_rng(seed))(_sample())
    assert_boxes_cover_their_pixels(out)


def test_flip_always_mirrors_coordinates():
    out = RandomFlip(1.0)(_sample())
    np.testing.assert_array_equal(out.boxes[0], [130 - 45, 10, 130 - 5, 50])
    assert_boxes_cover_their_pixels(out)


def test_pad_adds_114_bottom_right_and_keeps_boxes():
    s = _sample()
    out = Pad(160)(s)
    assert out.img.shape == (160, 160, 3)
    assert (out.img[90:] == 114).all() and (out.img[:, 130:] == 114).all()
    np.testing.assert_array_equal(out.img[:90, :130], s.img)
    np.testing.assert_array_equal(out.boxes, s.boxes)


def test_hsv_changes_colours_not_boxes():
    s = _sample()
    changed = 0
    for seed in range(8):
        out = YOLOXHSVRandomAug(rng=np.random.default_rng(seed))(s)
        np.testing.assert_array_equal(out.boxes, s.boxes)
        changed += int(not np.array_equal(out.img, s.img))
        assert_boxes_cover_their_pixels(out)
    assert changed >= 4  # each of H, S, V is jittered with probability 1/2


def test_filter_degenerate_drops_thin_boxes():
    s = _sample().replace(boxes=np.array([[0, 0, 10, 10], [5, 5, 5.5, 20], [0, 0, 30, 1]], np.float32),
                          labels=np.array([0, 1, 2], np.int64))
    out = FilterDegenerate(1.0)(s)
    np.testing.assert_array_equal(out.labels, [0])


def test_transforms_do_not_modify_their_input():
    s = _sample()
    img, boxes = s.img.copy(), s.boxes.copy()
    t = Compose([RandomResize(200, (0.5, 2.0)), RandomCrop(64), YOLOXHSVRandomAug(), RandomFlip(1.0), Pad(64)])
    t.reseed(0)
    t(s)
    np.testing.assert_array_equal(s.img, img)
    np.testing.assert_array_equal(s.boxes, boxes)


@pytest.mark.parametrize("seed", SEEDS)
def test_weak_pipeline_keeps_boxes_on_their_pixels(seed):
    pipeline = build_train_pipeline("s", img_size=96, stage=2, seed=seed)
    out = pipeline(_sample())
    assert out.img.shape == (96, 96, 3) and out.img.dtype == np.uint8
    assert_boxes_cover_their_pixels(out)


def test_pipeline_is_reproducible_for_a_seed():
    a = [build_train_pipeline("tiny", img_size=96, stage=1, seed=5)(_sample()) for _ in range(2)]
    np.testing.assert_array_equal(a[0].img, a[1].img)
    b = build_train_pipeline("tiny", img_size=96, stage=2, seed=6)(_sample())
    c = build_train_pipeline("tiny", img_size=96, stage=2, seed=7)(_sample())
    assert not np.array_equal(b.img, c.img)

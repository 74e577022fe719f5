"""Mixing augmentations: Mosaic (4 images on a 2s x 2s canvas) and MixUp (YOLOX style), cached as in RTMDet.

The cache (RTMDet paper/seed, section 1.1.1): each call pushes the freshly loaded sample into a queue of at most
`max_cached_images`; when the queue overflows, one entry is popped, at random (`random_pop=True`) or the oldest
(tiny, for steadier training). The other images a mix needs are drawn at random from the queue instead of being
loaded from disk, which is what makes the cached versions several times cheaper.

The geometry (`mosaic`, `mixup`) is in pure functions shared by the cached transforms and by the uncached
`Mosaic`/`MixUp`, which load their partner images from the dataset as YOLOv5/YOLOX do (used by the benchmark).
Transforms in this package never write into their input arrays, so cached samples are stored without copying.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np

from model.data.sample import Sample
from model.data.transforms import PAD_VALUE, RandomTransform, clip_boxes, hflip_boxes


class SampleCache:
    """A bounded queue of samples; on overflow pops a random entry or the oldest."""

    def __init__(self, max_size: int, random_pop: bool, rng: np.random.Generator):
        if max_size < 1:
            raise ValueError(f"cache size must be >= 1, got {max_size}")
        self.max_size = max_size
        self.random_pop = random_pop
        self.rng = rng
        self.items: list[Sample] = []

    def __len__(self) -> int:
        return len(self.items)

    def push(self, sample: Sample) -> None:
        self.items.append(sample)
        if len(self.items) > self.max_size:
            index = int(self.rng.integers(len(self.items))) if self.random_pop else 0
            self.items.pop(index)

    def pick(self) -> Sample:
        return self.items[int(self.rng.integers(len(self.items)))]


def _keep_nonempty(boxes: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], labels[keep]


def mosaic(samples: Sequence[Sample], img_scale: int, center: tuple[int, int], pad_value: int = PAD_VALUE) -> Sample:
    """Four samples (top-left, top-right, bottom-left, bottom-right) around `center` on a 2s x 2s canvas.

    Each image is first resized to fit an s x s square (keep ratio), then placed so that its inner corner is at
    the centre; parts that fall outside the canvas are cut (mmdet `Mosaic._mosaic_combine`). Boxes follow and are
    clipped to the canvas; boxes left with no area are dropped. The result keeps the first sample's image_id.
    """
    s = img_scale
    cx, cy = center
    canvas = np.full((2 * s, 2 * s, 3), pad_value, np.uint8)
    all_boxes, all_labels = [], []
    for loc, sample in zip(("top_left", "top_right", "bottom_left", "bottom_right"), samples, strict=True):
        h0, w0 = sample.img.shape[:2]
        ratio = min(s / h0, s / w0)
        w, h = max(1, int(w0 * ratio)), max(1, int(h0 * ratio))
        img = sample.img if (w, h) == (w0, h0) else cv2.resize(sample.img, (w, h), interpolation=cv2.INTER_LINEAR)
        if loc == "top_left":
            x1, y1, x2, y2 = max(cx - w, 0), max(cy - h, 0), cx, cy
            crop = (w - (x2 - x1), h - (y2 - y1), w, h)
        elif loc == "top_right":
            x1, y1, x2, y2 = cx, max(cy - h, 0), min(cx + w, 2 * s), cy
            crop = (0, h - (y2 - y1), min(w, x2 - x1), h)
        elif loc == "bottom_left":
            x1, y1, x2, y2 = max(cx - w, 0), cy, cx, min(2 * s, cy + h)
            crop = (w - (x2 - x1), 0, w, min(y2 - y1, h))
        else:
            x1, y1, x2, y2 = cx, cy, min(cx + w, 2 * s), min(2 * s, cy + h)
            crop = (0, 0, min(w, x2 - x1), min(y2 - y1, h))
        cx1, cy1, cx2, cy2 = crop
        canvas[y1:y2, x1:x2] = img[cy1:cy2, cx1:cx2]
        shift = np.array([x1 - cx1, y1 - cy1, x1 - cx1, y1 - cy1], np.float32)
        all_boxes.append(sample.boxes * np.float32(ratio) + shift)
        all_labels.append(sample.labels)
    boxes = clip_boxes(np.concatenate(all_boxes).astype(np.float32), 2 * s, 2 * s)
    boxes, labels = _keep_nonempty(boxes, np.concatenate(all_labels))
    return Sample(img=canvas, boxes=boxes, labels=labels, image_id=samples[0].image_id)


def mixup(dest: Sample, src: Sample, img_scale: int, jitter: float, flip: bool, offset_rng: np.random.Generator,
          pad_value: int = PAD_VALUE) -> Sample:
    """Blend `src` into `dest` 50/50 (YOLOX MixUp as in mmdet `MixUp.transform`).

    `src` is fitted into an s x s canvas (keep ratio, top-left), scaled by `jitter`, optionally flipped, then
    padded/cropped at a random offset to `dest`'s size. Boxes of both images are kept (clipped; empty dropped).
    """
    th, tw = dest.img.shape[:2]
    h0, w0 = src.img.shape[:2]
    ratio = min(img_scale / h0, img_scale / w0)
    rw, rh = max(1, int(w0 * ratio)), max(1, int(h0 * ratio))
    resized = src.img if (rw, rh) == (w0, h0) else cv2.resize(src.img, (rw, rh), interpolation=cv2.INTER_LINEAR)
    if (rw, rh) == (img_scale, img_scale):
        out = resized
    else:
        out = np.full((img_scale, img_scale, 3), pad_value, np.uint8)
        out[:rh, :rw] = resized
    ratio *= jitter
    jw, jh = max(1, int(out.shape[1] * jitter)), max(1, int(out.shape[0] * jitter))
    if (jw, jh) != out.shape[1::-1]:  # the official ratio_range is (1, 1): usually no second resize
        out = cv2.resize(out, (jw, jh), interpolation=cv2.INTER_LINEAR)
    if flip:
        out = cv2.flip(out, 1)  # ~10x faster than copying a reversed numpy view
    oh, ow = out.shape[:2]
    if (oh, ow) == (th, tw):
        patch = out
        x_off = y_off = 0
    else:
        padded = np.full((max(oh, th), max(ow, tw), 3), pad_value, np.uint8)
        padded[:oh, :ow] = out
        y_off = int(offset_rng.integers(0, padded.shape[0] - th + 1))
        x_off = int(offset_rng.integers(0, padded.shape[1] - tw + 1))
        patch = padded[y_off:y_off + th, x_off:x_off + tw]

    boxes = clip_boxes(src.boxes * np.float32(ratio), ow, oh)
    if flip:
        boxes = hflip_boxes(boxes, ow)
    boxes = clip_boxes(boxes - np.array([x_off, y_off, x_off, y_off], np.float32), tw, th)
    # mmdet computes 0.5*a + 0.5*b in float and truncates; cv2.addWeighted rounds instead (at most 1 level apart)
    # and is several times faster on uint8.
    img = cv2.addWeighted(dest.img, 0.5, np.ascontiguousarray(patch), 0.5, 0.0)
    all_boxes = np.concatenate([dest.boxes, boxes]).astype(np.float32)
    all_labels = np.concatenate([dest.labels, src.labels]).astype(np.int64)
    all_boxes, all_labels = _keep_nonempty(all_boxes, all_labels)
    return Sample(img=img, boxes=all_boxes, labels=all_labels, image_id=dest.image_id)


class _CachedTransform(RandomTransform):
    """Keeps a cache of recent samples (filled by every call) to draw partners from; the cache shares the
    transform's RNG so that `reseed` makes both reproducible."""

    min_cached = 1  # the input passes through until the cache holds more than this many samples

    def __init__(self, img_scale: int, max_cached_images: int, random_pop: bool, prob: float, pad_value: int,
                 rng: np.random.Generator | None):
        super().__init__(rng)
        self.img_scale = img_scale
        self.prob = prob
        self.pad_value = pad_value
        self.cache = SampleCache(max_cached_images, random_pop, self.rng)

    def reseed(self, seed) -> None:
        super().reseed(seed)
        self.cache.rng = self.rng

    def _cache_and_decide(self, sample: Sample) -> bool:
        """Cache `sample`; True when this call should mix (enough cached, and the probability draw says so)."""
        self.cache.push(sample)
        if len(self.cache) <= self.min_cached:
            return False
        return self.rng.uniform(0, 1) <= self.prob


class CachedMosaic(_CachedTransform):
    """Mosaic whose three partner images come from the cache (mmdet `CachedMosaic`).

    Until the cache holds more than four samples the input passes through unchanged, as in mmdet.
    """

    min_cached = 4

    def __init__(self, img_scale: int, max_cached_images: int = 40, random_pop: bool = True, prob: float = 1.0,
                 center_ratio_range: tuple[float, float] = (0.5, 1.5), pad_value: int = PAD_VALUE,
                 rng: np.random.Generator | None = None):
        super().__init__(img_scale, max_cached_images, random_pop, prob, pad_value, rng)
        self.center_ratio_range = center_ratio_range

    def __call__(self, sample: Sample) -> Sample:
        if not self._cache_and_decide(sample):
            return sample
        partners = [self.cache.pick() for _ in range(3)]
        center = (int(self.rng.uniform(*self.center_ratio_range) * self.img_scale),
                  int(self.rng.uniform(*self.center_ratio_range) * self.img_scale))
        return mosaic([sample, *partners], self.img_scale, center, self.pad_value)


class CachedMixUp(_CachedTransform):
    """MixUp with a partner drawn from the cache (mmdet `CachedMixUp`): up to `max_iters` draws to find one
    with boxes; passes the input through until the cache holds more than one sample, or with probability 1-prob."""

    def __init__(self, img_scale: int, max_cached_images: int = 20, random_pop: bool = True, prob: float = 1.0,
                 ratio_range: tuple[float, float] = (1.0, 1.0), flip_ratio: float = 0.5, max_iters: int = 15,
                 pad_value: int = PAD_VALUE, rng: np.random.Generator | None = None):
        super().__init__(img_scale, max_cached_images, random_pop, prob, pad_value, rng)
        self.ratio_range = ratio_range
        self.flip_ratio = flip_ratio
        self.max_iters = max_iters

    def __call__(self, sample: Sample) -> Sample:
        if not self._cache_and_decide(sample):
            return sample
        for _ in range(self.max_iters):
            partner = self.cache.pick()
            if len(partner.boxes):
                break
        return mix_with(sample, partner, self)


def mix_with(sample: Sample, partner: Sample, t: CachedMixUp | MixUp) -> Sample:
    jitter = t.rng.uniform(*t.ratio_range)
    flip = t.rng.uniform(0, 1) > t.flip_ratio
    return mixup(sample, partner, t.img_scale, jitter, flip, t.rng, t.pad_value)


class Mosaic(RandomTransform):
    """Uncached Mosaic: the three partners are loaded from `dataset` (disk read + decode) on every call."""

    def __init__(self, dataset: Callable[[int], Sample] | Sequence[Sample], img_scale: int,
                 center_ratio_range: tuple[float, float] = (0.5, 1.5), pad_value: int = PAD_VALUE,
                 rng: np.random.Generator | None = None):
        super().__init__(rng)
        self.dataset = dataset
        self.img_scale = img_scale
        self.center_ratio_range = center_ratio_range
        self.pad_value = pad_value

    def __call__(self, sample: Sample) -> Sample:
        n = len(self.dataset)
        partners = [self.dataset[int(self.rng.integers(n))] for _ in range(3)]
        center = (int(self.rng.uniform(*self.center_ratio_range) * self.img_scale),
                  int(self.rng.uniform(*self.center_ratio_range) * self.img_scale))
        return mosaic([sample, *partners], self.img_scale, center, self.pad_value)


class MixUp(RandomTransform):
    """Uncached MixUp: the partner is loaded from `dataset` and run through `pre_pipeline` on every call."""

    def __init__(self, dataset, img_scale: int, pre_pipeline: Callable[[Sample], Sample] | None = None,
                 ratio_range: tuple[float, float] = (1.0, 1.0), flip_ratio: float = 0.5,
                 pad_value: int = PAD_VALUE, rng: np.random.Generator | None = None):
        super().__init__(rng)
        self.dataset = dataset
        self.img_scale = img_scale
        self.pre_pipeline = pre_pipeline
        self.ratio_range = ratio_range
        self.flip_ratio = flip_ratio
        self.pad_value = pad_value

    def __call__(self, sample: Sample) -> Sample:
        partner = self.dataset[int(self.rng.integers(len(self.dataset)))]
        if self.pre_pipeline is not None:
            partner = self.pre_pipeline(partner)
        return mix_with(sample, partner, self)

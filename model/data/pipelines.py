"""The official RTMDet training pipelines (strong stage 1, weak stage 2), scaled to any image size.

Numbers are MMDetection 3.3.0's `configs/rtmdet/rtmdet_<size>_8xb32-300e_coco.py` (`train_pipeline`,
`train_pipeline_stage2`), as listed in the project's reference `train_configs.json`. Pixel sizes are stated for
the official 640 input and scale linearly with `img_size`, so a 320-pixel CPU run keeps the same recipe.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from model.config import model_spec
from model.data.mix import CachedMixUp, CachedMosaic
from model.data.sample import Sample
from model.data.transforms import (
    PAD_VALUE,
    Compose,
    FilterDegenerate,
    Pad,
    RandomCrop,
    RandomFlip,
    RandomResize,
    YOLOXHSVRandomAug,
)

OFFICIAL_IMG_SIZE = 640


@dataclass(frozen=True)
class AugmentSpec:
    """Per-size augmentation numbers at the official 640 input."""

    mosaic_cache: int
    mosaic_random_pop: bool
    mixup_cache: int
    mixup_random_pop: bool
    mixup_prob: float
    resize_ratio_range: tuple[float, float]
    # Shared by every size:
    mosaic_prob: float = 1.0
    mosaic_center_ratio_range: tuple[float, float] = (0.5, 1.5)
    mixup_ratio_range: tuple[float, float] = (1.0, 1.0)
    mixup_flip_ratio: float = 0.5
    mixup_max_iters: int = 15
    stage1_resize_scale: int = 1280  # RandomResize scale after the 2x-sized mosaic canvas
    stage2_resize_scale: int = 640
    crop_size: int = 640
    hsv_deltas: tuple[int, int, int] = (5, 30, 30)  # YOLOXHSVRandomAug hue, saturation, value
    flip_prob: float = 0.5
    pad_value: int = PAD_VALUE
    min_box_size: float = 1.0  # degenerate-box filter (not in the official pipeline: mosaic can leave slivers)


# tiny: half-size caches popping the oldest entry and MixUp at p=0.5 "for steadier training" (seed, 1.1.1).
AUGMENT_SPECS: dict[str, AugmentSpec] = {
    "tiny": AugmentSpec(20, False, 10, False, 0.5, (0.5, 2.0)),
    "s": AugmentSpec(40, True, 20, True, 1.0, (0.5, 2.0)),
    "m": AugmentSpec(40, True, 20, True, 1.0, (0.1, 2.0)),
    "l": AugmentSpec(40, True, 20, True, 1.0, (0.1, 2.0)),
    "x": AugmentSpec(40, True, 20, True, 1.0, (0.1, 2.0)),
}


def augment_spec(size: str) -> AugmentSpec:
    model_spec(size)  # one error message for unknown sizes
    return AUGMENT_SPECS[size]


def _scaled(pixels: int, img_size: int) -> int:
    return max(1, round(pixels * img_size / OFFICIAL_IMG_SIZE))


def build_train_pipeline(size: str, img_size: int = 640, stage: int = 1, seed: int | None = None
                         ) -> Callable[[Sample], Sample]:
    """Stage 1 (strong): CachedMosaic, RandomResize(2*img_size), RandomCrop, HSV, Flip, Pad, CachedMixUp,
    FilterDegenerate. Stage 2 (weak): RandomResize(img_size), RandomCrop, HSV, Flip, Pad, FilterDegenerate.

    Returns a `Compose`; call `.reseed(seed)` on it to re-seed every random transform (done per worker).
    """
    spec = augment_spec(size)
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    crop = _scaled(spec.crop_size, img_size)
    common = [
        RandomCrop(crop),
        YOLOXHSVRandomAug(*spec.hsv_deltas),
        RandomFlip(spec.flip_prob),
        Pad(crop, spec.pad_value),
    ]
    if stage == 1:
        transforms = [
            CachedMosaic(img_size, spec.mosaic_cache, spec.mosaic_random_pop, spec.mosaic_prob,
                         spec.mosaic_center_ratio_range, spec.pad_value),
            RandomResize(_scaled(spec.stage1_resize_scale, img_size), spec.resize_ratio_range),
            *common,
            CachedMixUp(img_size, spec.mixup_cache, spec.mixup_random_pop, spec.mixup_prob, spec.mixup_ratio_range,
                        spec.mixup_flip_ratio, spec.mixup_max_iters, spec.pad_value),
        ]
    else:
        transforms = [RandomResize(_scaled(spec.stage2_resize_scale, img_size), spec.resize_ratio_range), *common]
    transforms.append(FilterDegenerate(spec.min_box_size))
    pipeline = Compose(transforms)
    if seed is not None:
        pipeline.reseed(seed)
    return pipeline

"""Cached vs uncached Mosaic and MixUp (ms per 100 images), and augmentation throughput per worker process.

As in the RTMDet seed's table (Mosaic 87.1 -> 24.0 ms, MixUp 19.3 -> 12.4 ms per 100 images), each number times
the mixing transform alone: the current image is already loaded (LoadImageFromFile is a separate step), the
uncached versions read and decode their partner images from disk inside the call (3 for Mosaic, 1 for MixUp),
the cached ones take them from the cache. Both run in this one process, on the same images, in one run.

    .venv/bin/python bench/bench_augment.py                      # a temporary 640-px shapes set
    .venv/bin/python bench/bench_augment.py --data data/shapes --img-size 320
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.data.coco import CocoDetection  # noqa: E402
from model.data.mix import CachedMixUp, CachedMosaic, MixUp, Mosaic  # noqa: E402
from model.data.pipelines import augment_spec, build_train_pipeline  # noqa: E402
from model.data.shapes import make_shapes_dataset  # noqa: E402
from model.data.transforms import Pad, RandomResize  # noqa: E402


def _per_100(transforms: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """{name: (wall ms, CPU ms)} per 100 images: median over `repeats` passes of `transform` over `inputs`.

    Passes of the different transforms are interleaved so that load from other processes on a shared machine
    hits them alike; process CPU time is reported beside wall time because it is less sensitive to that load.
    """
    walls: dict[str, list[float]] = {k: [] for k in transforms}
    cpus: dict[str, list[float]] = {k: [] for k in transforms}
    for _ in range(repeats):
        for name, (transform, inputs) in transforms.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for sample in inputs:
                transform(sample)
            walls[name].append((time.perf_counter() - wall) * 1000 * 100 / len(inputs))
            cpus[name].append((time.process_time() - cpu) * 1000 * 100 / len(inputs))
    return {k: (statistics.median(walls[k]), statistics.median(cpus[k])) for k in transforms}


def _images_per_second(pipeline, dataset, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        pipeline(dataset[i % len(dataset)])
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="COCO-style dir with annotations/instances_train.json and train/")
    parser.add_argument("--img-size", type=int, default=640)
    parser.add_argument("--size", default="s", help="model size whose cache settings to use (s: 40/20 random pop)")
    parser.add_argument("--images", type=int, default=200, help="images in the temporary set / timed per pass")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    cv2.setNumThreads(1)  # one DataLoader worker's view

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "shapes"
            make_shapes_dataset(data, args.images, 0, seed=0, img_size=args.img_size)
        dataset = CocoDetection(data / "annotations" / "instances_train.json", data / "train")
        n = min(args.images, len(dataset))
        spec = augment_spec(args.size)
        s = args.img_size
        loaded = [dataset[i] for i in range(n)]
        # MixUp runs on the padded crop the pipeline produces; give it inputs of that size.
        letterbox = lambda x: Pad(s)(RandomResize(s, (1.0, 1.0))(x))  # noqa: E731
        mix_inputs = [letterbox(x) for x in loaded]

        cached_mosaic = CachedMosaic(s, spec.mosaic_cache, spec.mosaic_random_pop, rng=np.random.default_rng(0))
        for x in loaded[:spec.mosaic_cache]:  # fill the cache first: steady state, as in a long epoch
            cached_mosaic(x)
        cached_mixup = CachedMixUp(s, spec.mixup_cache, spec.mixup_random_pop, prob=1.0,
                                   rng=np.random.default_rng(0))
        for x in mix_inputs[:spec.mixup_cache]:
            cached_mixup(x)
        t = _per_100({
            "Mosaic": (Mosaic(dataset, s, rng=np.random.default_rng(0)), loaded),
            "Mosaic cached": (cached_mosaic, loaded),
            "MixUp": (MixUp(dataset, s, rng=np.random.default_rng(0)), mix_inputs),
            "MixUp cached": (cached_mixup, mix_inputs),
        }, args.repeats)

        print(f"images {n} x {args.repeats} passes, img_scale {s}, cache sizes from size '{args.size}' "
              f"(Mosaic {spec.mosaic_cache}, MixUp {spec.mixup_cache}), data {data}")
        print(f"{'ms per 100 images':18s}{'no cache':>10s}{'cache':>10s}{'speed-up':>10s}"
              f"{'CPU no cache':>14s}{'CPU cache':>11s}{'CPU speed-up':>14s}")
        for name in ("Mosaic", "MixUp"):
            (uw, uc), (cw, cc) = t[name], t[name + " cached"]
            print(f"{name:18s}{uw:10.1f}{cw:10.1f}{uw / cw:9.2f}x{uc:14.1f}{cc:11.1f}{uc / cc:13.2f}x")

        print("\nfull pipeline, load + augment, one process (= one DataLoader worker):")
        for stage in (1, 2):
            pipeline = build_train_pipeline(args.size, img_size=s, stage=stage, seed=0)
            for i in range(60):  # warm the caches
                pipeline(loaded[i % n])
            ips = _images_per_second(pipeline, dataset, max(n, 100))
            print(f"  stage {stage} ({'strong' if stage == 1 else 'weak'}): {ips:7.1f} images/s per worker")
    return 0


if __name__ == "__main__":
    sys.exit(main())

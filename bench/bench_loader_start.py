"""What starting data-loader workers from the forkserver costs against forking them from the trainer.

A loader's start (workers up, first batch in hand) and one full epoch, for the trainer's loader as it is
(`forkserver`, see model/data/loader.py) and with `fork` (what it used before issue 12, and what hangs), in one
process, alternating which goes first each round. The dataset is a COCO shapes set, so each worker unpickles a
real CocoDetection (its annotations) on start.

    .venv/bin/python bench/bench_loader_start.py --images 256 --workers 1 2 4 --rounds 3
"""
from __future__ import annotations

import argparse
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.data.coco import CocoDetection  # noqa: E402
from model.data.loader import build_train_loader  # noqa: E402


def time_loader(dataset, workers: int, context: str | None, img_size: int, batch: int) -> tuple[float, float]:
    loader = build_train_loader(dataset, "tiny", img_size, batch, workers, stage=1, distributed=False, seed=0,
                                timeout_s=120)
    if context is not None:
        loader.multiprocessing_context = context  # the old behaviour: workers forked from this process
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    start = time.perf_counter() - t0
    for _ in it:
        pass
    epoch = time.perf_counter() - t0
    del it, loader
    return start, epoch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--img-size", type=int, default=320)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # Made in a child process: OpenCV work here would leave its thread pool in this process, and then the
        # `fork` side hangs (the bug this compares against) instead of being timed.
        subprocess.run([sys.executable, "-c", "import sys; from model.data.shapes import make_shapes_dataset; "
                        f"make_shapes_dataset(sys.argv[1], {args.images}, 1, seed=0, img_size={args.img_size})", tmp],
                       check=True, timeout=600, cwd=Path(__file__).resolve().parent.parent)
        dataset = CocoDetection(Path(tmp) / "annotations" / "instances_train.json", Path(tmp) / "train")
        print(f"{len(dataset)} images ({args.img_size} px, {len(pickle.dumps(dataset)) / 1e3:.0f} kB pickled), "
              f"batch {args.batch}, {args.rounds} rounds alternating; medians")
        print("| workers | start: forkserver | start: fork | epoch: forkserver | epoch: fork |")
        print("|---|---|---|---|---|")
        for workers in args.workers:
            res: dict[str, list[tuple[float, float]]] = {"forkserver": [], "fork": []}
            for r in range(args.rounds):
                order = ["forkserver", "fork"] if r % 2 == 0 else ["fork", "forkserver"]
                for name in order:
                    res[name].append(time_loader(dataset, workers, None if name == "forkserver" else "fork",
                                                 args.img_size, args.batch))
            med = {k: (statistics.median(s for s, _ in v), statistics.median(e for _, e in v)) for k, v in res.items()}
            print(f"| {workers} | {med['forkserver'][0]:.2f} s | {med['fork'][0]:.2f} s | "
                  f"{med['forkserver'][1]:.2f} s | {med['fork'][1]:.2f} s |", flush=True)


if __name__ == "__main__":
    main()

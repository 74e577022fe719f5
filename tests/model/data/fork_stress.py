"""Start a fresh training loader (one worker) right after OpenCV work in this process, N times in a row.

Run as a script by `test_loader_workers.py` (`python fork_stress.py N [timeout_s]`), so that this process is the
loader's parent, has run OpenCV (whose thread pool then exists) and has nothing else going on. Prints one line per
start; the caller's timeout catches a start that never returns (a worker forked with a held lock, issue 12).
"""
import sys
import time

import cv2
import numpy as np

from model.data.loader import build_train_loader
from model.data.sample import Sample


def main() -> None:
    n = int(sys.argv[1])
    timeout_s = float(sys.argv[2]) if len(sys.argv) > 2 else 60.0
    rng = np.random.default_rng(0)
    data = [Sample(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8), np.array([[10, 10, 60, 60]], np.float32),
                   np.array([0], np.int64), i) for i in range(8)]
    big = rng.integers(0, 255, (800, 800, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    for i in range(n):
        for _ in range(3):  # what a validation's letterbox (and any augmentation) does in the parent
            cv2.GaussianBlur(cv2.resize(big, (640, 640)), (9, 9), 0)
        # Alternate the stages as the trainer does at its switch; each loader starts its own worker.
        loader = build_train_loader(data, "tiny", 64, 4, workers=1, stage=1 + i % 2, distributed=False, seed=i,
                                    timeout_s=timeout_s)
        imgs, _, _ = next(iter(loader))
        assert imgs.shape == (4, 64, 64, 3)
        del loader
        print(f"start {i + 1} {time.perf_counter() - t0:.2f}", flush=True)


if __name__ == "__main__":
    main()

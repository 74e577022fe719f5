"""A small two-stage training run with workers and validation every epoch, in a process that ran OpenCV first.

`python stage_switch_run.py DIR`: makes a 640-px shapes set in DIR (OpenCV, in this process: its thread pool
exists from then on, as after any image work a user's script does), then trains RTMDet-tiny at 320 for 3 epochs
(the last one stage 2) with 2 workers and a validation after every epoch (the letterbox resize runs on that
pool too). With workers forked from this process, the stage-2 loader hung (issue 12) in 3 of 3 runs.
"""
import sys
from pathlib import Path

from model.data.shapes import make_shapes_dataset
from model.train.engine import TrainConfig, Trainer


def main() -> None:
    root = Path(sys.argv[1])
    make_shapes_dataset(root / "data", 8, 2, seed=12, img_size=640)
    cfg = TrainConfig(data=str(root / "data"), out=str(root / "run"), size="tiny", epochs=3, batch_size=4,
                      img_size=320, stage2_epochs=1, workers=2, val_interval=1, warmup_iters=2, threads=1,
                      progress=False, loader_timeout_s=120)
    print(Trainer(cfg).run(), flush=True)


if __name__ == "__main__":
    main()

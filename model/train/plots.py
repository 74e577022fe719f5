"""PNG plots of a training run (loss curve, mAP per validation) from its CSV logs."""
from __future__ import annotations

import csv
from pathlib import Path


def _read(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def plot_training(out_dir: str | Path) -> list[Path]:
    """Write loss.png (and map.png when there were validations) into `out_dir`; returns the files written."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    from model.train.engine import TRAIN_LOG, VAL_LOG

    out = Path(out_dir)
    written = []
    rows = _read(out / TRAIN_LOG)
    if rows:
        it = [int(r["iter"]) for r in rows]
        fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
        for key in ("loss", "loss_cls", "loss_bbox"):
            ax.plot(it, [float(r[key]) for r in rows], label=key)
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        ax_lr.plot(it, [float(r["lr"]) for r in rows], color="gray")
        ax_lr.set_ylabel("lr")
        ax_lr.set_xlabel("iteration")
        fig.tight_layout()
        fig.savefig(out / "loss.png", dpi=100)
        plt.close(fig)
        written.append(out / "loss.png")
    val = _read(out / VAL_LOG)
    if val:
        ep = [int(r["epoch"]) for r in val]
        fig, ax = plt.subplots(figsize=(8, 4))
        for key in ("AP", "AP50", "AP75"):
            ax.plot(ep, [float(r[key]) for r in val], marker="o", label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel("COCO mAP")
        ax.set_ylim(0, 1)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "map.png", dpi=100)
        plt.close(fig)
        written.append(out / "map.png")
    return written

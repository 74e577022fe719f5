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


def plot_pr_curves(result, path: str | Path, max_legend: int = 20) -> Path:
    """Precision-recall curves of a `CocoEvalResult` (area all, 100 detections): one thin line per class at
    IoU 0.50, and the class mean at IoU 0.50, 0.75 and over 0.50:0.95. Written as PNG to `path`."""
    import warnings

    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recall = result.recall_points
    prec = result.precision[:, :, :, 0, -1]  # (IoU, recall, class)
    fig, ax = plt.subplots(figsize=(8, 6))
    for k, name in enumerate(result.class_names):
        curve = prec[0, :, k]
        if (curve > -1).any():
            label = f"{name} (AP50 {result.class_ap50[k]:.3f})" if k < max_legend else None
            ax.plot(recall, np.where(curve > -1, curve, np.nan), lw=1, alpha=0.6, label=label)

    def class_mean(p: np.ndarray) -> np.ndarray:  # (recall, class) -> (recall,), over classes with GT
        defined = p > -1
        return np.where(defined.any(1), np.where(defined, p, 0).sum(1) / np.maximum(defined.sum(1), 1), np.nan)

    with warnings.catch_warnings():  # recall points no class reaches are nan in every row: a gap in the line
        warnings.simplefilter("ignore", RuntimeWarning)
        overall = np.nanmean(np.stack([class_mean(prec[t]) for t in range(prec.shape[0])]), 0)
    for curve, label, style in ((class_mean(prec[0]), "mean @ IoU 0.50", "-"),
                                (class_mean(prec[5]), "mean @ IoU 0.75", "--"),
                                (overall, "mean @ IoU 0.50:0.95", ":")):
        ax.plot(recall, curve, color="black", lw=2.5, ls=style, label=label)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(f"COCO AP {result.stats['AP']:.3f}, AP50 {result.stats['AP50']:.3f} ({result.backend})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

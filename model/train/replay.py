"""Train on fixed, pre-built batches: the Trainer's own step, optimiser, lr schedule and EMA, without the data
loader and its augmentation, so that a run can be compared number for number with another trainer's
(tools/mmdet_train_parity.py runs MMDetection's Runner on the same batches; tests/model/train/test_loop_parity.py
checks this side against the stored result).

Batches are taken in order, the same every epoch: batch j of an epoch holds images j*B .. (j+1)*B - 1.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from model.checkpoint import make_meta, save_checkpoint, standard_layout
from model.config import PIXEL_MEAN_BGR, PIXEL_STD_BGR
from model.train.engine import TrainConfig, Trainer
from model.train.schedule import BASE_BATCH, LrSchedule


@dataclass(frozen=True)
class ReplayPlan:
    epochs: int
    stage2_epochs: int
    warmup_iters: int
    batch_size: int
    lr: float  # the lr of a step after warm-up (for this batch size, no further scaling)
    size: str = "tiny"
    # float64 makes the run reproducible across implementations: in float32 the summation-order noise of two
    # correct trainers (1e-7 relative) grows step by step through the network and the assigner's top-k choices.
    dtype: str = "float64"


@dataclass
class ReplayResult:
    rows: list[dict] = field(default_factory=list)  # per iteration: epoch, stage, lr, loss, loss_cls, loss_bbox
    raw: dict[str, torch.Tensor] = field(default_factory=dict)  # final training weights (standard layout)
    ema: dict[str, torch.Tensor] = field(default_factory=dict)  # final EMA weights
    ema_steps: int = 0
    weight_decay: dict[str, float] = field(default_factory=dict)  # per parameter name, from the optimizer
    optimizer_defaults: dict = field(default_factory=dict)


class _Normalize:
    """uint8 (B, H, W, 3) BGR -> (x - mean) / std in `dtype`, channels_last (what the Trainer's network runs in).
    The mean and std are the float32 constants both the Trainer's Normalizer and MMDetection's preprocessor use."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.mean = torch.tensor(PIXEL_MEAN_BGR, dtype=torch.float32).to(dtype).view(1, 3, 1, 1)
        self.std = torch.tensor(PIXEL_STD_BGR, dtype=torch.float32).to(dtype).view(1, 3, 1, 1)

    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        x = (imgs.permute(0, 3, 1, 2).to(self.mean.dtype) - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)


def write_coco_split(root: Path, images: torch.Tensor, boxes: list[torch.Tensor], labels: list[torch.Tensor],
                     class_names: list[str]) -> None:
    """`root/annotations/instances_train.json` + `root/train/*.png` (lossless) for the Trainer to open."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "train").mkdir(parents=True, exist_ok=True)
    h, w = images.shape[1:3]
    entries, anns = [], []
    for i, (img, bx, lb) in enumerate(zip(images.numpy(), boxes, labels, strict=True)):
        name = f"{i:04d}.png"
        if not cv2.imwrite(str(root / "train" / name), np.ascontiguousarray(img)):
            raise OSError(f"could not write {root / 'train' / name}")
        entries.append({"id": i + 1, "file_name": name, "height": int(h), "width": int(w)})
        for (x1, y1, x2, y2), c in zip(bx.tolist(), lb.tolist(), strict=True):
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(c) + 1,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    cats = [{"id": k + 1, "name": n} for k, n in enumerate(class_names)]
    (root / "annotations" / "instances_train.json").write_text(
        json.dumps({"images": entries, "annotations": anns, "categories": cats}))


def replay(images: torch.Tensor, boxes: list[torch.Tensor], labels: list[torch.Tensor], class_names: list[str],
           init_state: dict[str, torch.Tensor], plan: ReplayPlan, workdir: str | Path) -> ReplayResult:
    """Train from `init_state` on `images` (N x H x W x 3 uint8 BGR, N a multiple of the batch size) on the CPU.

    The Trainer is built as `rtmdet train` builds it (its data folder holds the same images, as PNG) and
    starts from `init_state` through `--load-from`; only its loop over the data loader is replaced by the
    fixed batches.
    """
    n, b = images.shape[0], plan.batch_size
    if n % b:
        raise ValueError(f"{n} images do not split into batches of {b}")
    work = Path(workdir)
    write_coco_split(work / "data", images, boxes, labels, class_names)
    save_checkpoint(work / "init.pth", init_state, make_meta(class_names, size=plan.size))
    cfg = TrainConfig(data=str(work / "data"), out=str(work / "run"), size=plan.size, epochs=plan.epochs,
                      batch_size=b, img_size=int(images.shape[1]), stage2_epochs=plan.stage2_epochs, workers=0,
                      device="cpu", amp=False, load_from=str(work / "init.pth"), warmup_iters=plan.warmup_iters,
                      base_lr=plan.lr * BASE_BATCH / b, progress=False)
    trainer = Trainer(cfg)
    dtype = getattr(torch, plan.dtype)
    if dtype != torch.float32:
        # In place (the optimizer and the EMA keep their tensors); the input is normalised in that precision too.
        trainer.model.to(dtype)
        trainer.ema.module.to(dtype)
        trainer.normalizer = _Normalize(dtype)
    per_epoch = n // b
    if trainer.iters_per_epoch() != per_epoch:
        raise RuntimeError(f"Trainer counts {trainer.iters_per_epoch()} iterations per epoch, the replay {per_epoch}")
    schedule = LrSchedule.from_config(trainer.optim_cfg, plan.epochs, per_epoch)
    result = ReplayResult()
    trainer.net.train()
    for epoch in range(plan.epochs):
        for j in range(per_epoch):
            sl = slice(j * b, (j + 1) * b)
            out = trainer.train_step(images[sl], boxes[sl], labels[sl], schedule)
            result.rows.append({"epoch": epoch, "stage": trainer.stage_of(epoch), **out})
    result.raw = standard_layout(trainer.model.state_dict())
    result.ema = standard_layout(trainer.ema.module.state_dict())
    result.ema_steps = trainer.ema.steps
    names = {id(p): k for k, p in trainer.model.named_parameters()}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            result.weight_decay[names[id(p)]] = float(group["weight_decay"])
    result.optimizer_defaults = {k: trainer.optimizer.defaults[k] for k in ("betas", "eps", "amsgrad")}
    return result


FULL_NUMEL = 4096  # a digest keeps tensors up to this size whole (every norm parameter, bias and BN statistic)
N_SAMPLES = 512  # and this many evenly spread elements of each larger one (the conv kernels), with its L2 norm


def sample_index(numel: int, n: int = N_SAMPLES) -> torch.Tensor:
    return torch.linspace(0, numel - 1, min(n, numel), dtype=torch.float64).round().long()


def digest(state: dict[str, torch.Tensor], full_numel: int = FULL_NUMEL, n_samples: int = N_SAMPLES,
           dtype: torch.dtype = torch.float32) -> dict:
    """A small stand-in for a state_dict (tiny's is 20 MB), packed into a few tensors (a file of many small
    tensors is mostly per-tensor overhead): integer and small float tensors whole, larger ones as `n_samples`
    evenly spread elements plus their L2 norm. Floats are kept in `dtype` (float32 keeps 1e-7 of each value:
    plenty for comparisons at 1e-4). `unpack_digest` gives the per-key view back."""
    keys, kinds, values, ints, norms = [], [], [], [], []
    for k, v in state.items():
        v = v.detach().reshape(-1)
        keys.append(k)
        if not v.is_floating_point():
            kinds.append(0)
            ints.append(v.long())
        elif v.numel() <= full_numel:
            kinds.append(1)
            values.append(v.to(dtype))
        else:
            kinds.append(2)
            values.append(v[sample_index(v.numel(), n_samples)].to(dtype))
            norms.append(v.double().norm().to(dtype).reshape(1))
    return {"keys": keys, "kinds": torch.tensor(kinds, dtype=torch.int8),
            "sizes": torch.tensor([t.numel() for t in values], dtype=torch.int64),
            "values": torch.cat(values) if values else torch.zeros(0, dtype=dtype),
            "ints": torch.cat(ints) if ints else torch.zeros(0, dtype=torch.int64),
            "int_sizes": torch.tensor([t.numel() for t in ints], dtype=torch.int64),
            "norms": torch.cat(norms) if norms else torch.zeros(0, dtype=dtype)}


def unpack_digest(d: dict) -> dict[str, dict[str, torch.Tensor]]:
    """{key: {"full": t}} or {key: {"samples": t, "norm": t}} (tensors flattened) from a `digest`."""
    values = iter(d["values"].split(d["sizes"].tolist()))
    ints = iter(d["ints"].split(d["int_sizes"].tolist()))
    norms = iter(d["norms"])
    out = {}
    for k, kind in zip(d["keys"], d["kinds"].tolist(), strict=True):
        out[k] = {"full": next(ints)} if kind == 0 else {"full": next(values)} if kind == 1 else \
            {"samples": next(values), "norm": next(norms)}
    return out

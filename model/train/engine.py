"""The training loop: two-stage data schedule, AdamW + warm-up/flat/cosine lr, EMA, AMP, DDP, checkpoints.

One process per device; under `torchrun` (WORLD_SIZE > 1) every process trains a DistributedDataParallel
replica on its shard of the data, and rank 0 alone logs, validates and writes checkpoints.

Checkpoints follow MMDetection's layout: `state_dict` holds the EMA weights (the ones evaluated and
shipped); training checkpoints add `ema_state_dict` (after mmengine's swap it holds the *raw* training
weights as `module.<key>`, plus `steps`), `optimizer`, `scheduler`, `epoch`, `iter` and RNG states, all plain
tensors/containers so `torch.load(..., weights_only=True)` reads them.
"""
from __future__ import annotations

import csv
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from model import zoo as model_zoo
from model.checkpoint import load_state_dict_strict, make_meta, read_checkpoint, save_checkpoint, standard_layout
from model.data.coco import CocoDetection
from model.data.formats import open_split
from model.data.loader import DEFAULT_LOADER_TIMEOUT_S, DataLoaderStalled, batches, build_train_loader
from model.inference.preprocess import Normalizer
from model.nn.rtmdet import build_rtmdet
from model.train.ema import ExpMomentumEMA
from model.train.evaluate import evaluate_model
from model.train.schedule import LrSchedule, OptimConfig, build_optimizer

TRAIN_LOG = "train_log.csv"
VAL_LOG = "val_log.csv"
TRAIN_FIELDS = ("epoch", "iter", "lr", "loss", "loss_cls", "loss_bbox", "imgs_per_s", "time")


@dataclass
class TrainConfig:
    data: str
    out: str
    size: str = "tiny"
    epochs: int = 300
    batch_size: int = 32  # per process; the lr scales with batch_size * world size
    img_size: int = 640
    stage2_epochs: int = 20
    workers: int = 4
    val_interval: int = 10
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # only on CUDA
    sync_bn: bool = False  # only with several CUDA processes
    compile: bool = False  # torch.compile the network (inductor fuses BatchNorm + SiLU, forward and backward)
    resume: bool = False
    load_from: str | None = None  # start from these weights (fine-tuning); schedule, optimizer and epoch start fresh
    load_from_key: str = "ema"  # which weights of a training checkpoint `load_from` takes (model.checkpoint)
    backbone_weights: str | None = None  # ImageNet-pretrained CSPNeXt (file or zoo name) for the backbone only
    data_format: str = "auto"  # coco, yolo, voc, or auto (from the layout)
    warmup_iters: int = 1000
    base_lr: float = 0.004  # for a total batch of 256; scaled linearly with the real total batch
    log_interval: int = 10
    loader_timeout_s: float = DEFAULT_LOADER_TIMEOUT_S  # a batch later than this from a worker ends the run
    save_interval: int = 1  # epochs between last.pth writes (always after the last epoch)
    threads: int = 0  # torch CPU threads per process; 0 keeps torch's default
    val_batch_size: int = 8
    max_val_images: int | None = None
    progress: bool = True


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str) -> tuple[DistInfo, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device in ("auto", ""):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local) if world > 1 else DistInfo()
    return info, dev


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, torch.Tensor]:
    """Every RNG as tensors (weights_only-loadable)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(),
             "python": torch.tensor(py[1], dtype=torch.int64),
             "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
             "numpy_pos": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
             "numpy_gauss": torch.tensor(np_state[4], dtype=torch.float64)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))
    pos, has_gauss = state["numpy_pos"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(pos), int(has_gauss),
                         float(state["numpy_gauss"])))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class CsvLog:
    """Append rows to a CSV file (header once), flushed per row so a crash loses nothing."""

    def __init__(self, path: Path, fields: tuple[str, ...]) -> None:
        self.path, self.fields = path, fields
        if not path.exists():
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(fields)

    def write(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([row.get(k, "") for k in self.fields])


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        if cfg.epochs < 1 or cfg.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if cfg.load_from and cfg.backbone_weights:
            raise ValueError("--load-from sets every weight, --backbone-weights only the backbone's: give one")
        self.cfg = cfg
        if cfg.threads > 0:
            # On a busy CPU, OpenMP threads that wait for each other cost far more than they bring.
            torch.set_num_threads(cfg.threads)
        self.dist, self.device = setup_distributed(cfg.device)
        seed_everything(cfg.seed)  # same initial weights on every rank
        self.out = Path(cfg.out)
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)

        self.train_set = open_split(cfg.data, "train", cfg.data_format, training=True)
        try:
            self.val_set: CocoDetection | None = open_split(cfg.data, "val", cfg.data_format)
        except FileNotFoundError:
            self.val_set = None
        self.class_names = self.train_set.class_names

        # The whole network trains in channels_last: oneDNN's CPU convolutions (forward and backward) and
        # cuDNN's tensor-core kernels are faster in it, and the layout then never changes inside the network.
        # Checkpoints are still written in the standard layout (`model.checkpoint.standard_layout`).
        model = build_rtmdet(cfg.size, num_classes=self.train_set.num_classes).to(
            self.device, memory_format=torch.channels_last)
        self.model = model
        self.ema = ExpMomentumEMA(model)
        self.optim_cfg = OptimConfig(base_lr=cfg.base_lr, warmup_iters=cfg.warmup_iters)
        self.total_batch = cfg.batch_size * self.dist.world
        self.base_lr = self.optim_cfg.scaled_lr(self.total_batch)
        self.optimizer = build_optimizer(model, self.optim_cfg, self.total_batch)
        self.use_amp = cfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.normalizer = Normalizer(self.device, channels_last=True)

        self.net: nn.Module = model
        if self.dist.world > 1:
            if cfg.sync_bn and self.device.type == "cuda":
                self.net = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        if cfg.compile:
            # Static shapes: a training run sees one input size (plus a smaller last batch), and a graph per
            # shape is faster than one symbolic graph. Only the forward pass is compiled (its backward with
            # it); the loss, with its per-image box counts, stays eager. `self.model` keeps the plain keys.
            self.net = torch.compile(self.net, dynamic=False)

        self.epoch, self.iter, self.best_ap = 0, 0, -1.0
        self.loader = None
        self.loader_stage = 0
        if cfg.resume:
            self._resume()
        elif cfg.load_from:
            self._load_weights(cfg.load_from)
        elif cfg.backbone_weights:
            self._load_backbone(cfg.backbone_weights)
        self.stage1_epochs = max(0, cfg.epochs - cfg.stage2_epochs)

    # ----------------------------------------------------------------------------------------- data
    def stage_of(self, epoch: int) -> int:
        return 1 if epoch < self.stage1_epochs else 2

    def _loader_for(self, epoch: int):
        stage = self.stage_of(epoch)
        if self.loader is None or stage != self.loader_stage:
            self.loader = None  # drop the old loader (and its worker processes) before starting new ones
            self.loader = build_train_loader(self.train_set, self.cfg.size, self.cfg.img_size, self.cfg.batch_size,
                                             self.cfg.workers, stage, self.dist.world > 1, self.cfg.seed,
                                             timeout_s=self.cfg.loader_timeout_s)
            self.loader_stage = stage
        # Every epoch's shuffle (and, without workers, its augmentation stream) is a function of
        # (seed, epoch), so a resumed run draws the same batches as an uninterrupted one.
        sampler = self.loader.sampler
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        elif getattr(sampler, "generator", None) is not None:
            sampler.generator.manual_seed(self.cfg.seed * 100003 + epoch)
        pipeline = getattr(self.loader.dataset, "pipeline", None)
        if self.cfg.workers == 0 and hasattr(pipeline, "reseed"):
            pipeline.reseed([self.cfg.seed, self.dist.rank, stage, epoch])
        return self.loader

    def iters_per_epoch(self) -> int:
        per_rank = math.ceil(len(self.train_set) / self.dist.world)
        return math.ceil(per_rank / self.cfg.batch_size)

    # ----------------------------------------------------------------------------------------- loop
    def train_step(self, imgs: torch.Tensor, boxes: list[torch.Tensor], labels: list[torch.Tensor],
                   schedule: LrSchedule) -> dict[str, float]:
        lr = schedule.apply(self.optimizer, self.base_lr, self.iter)
        x = self.normalizer(imgs)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.use_amp):
            cls_scores, bbox_preds = self.net(x)
        losses = self.model.bbox_head.loss(cls_scores, bbox_preds, [b.to(self.device) for b in boxes],
                                           [lab.to(self.device) for lab in labels])
        loss_cls = sum(losses["loss_cls"])
        loss_bbox = sum(losses["loss_bbox"])
        loss = loss_cls + loss_bbox
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"non-finite loss {float(loss)} at iteration {self.iter} "
                                     f"(loss_cls {float(loss_cls)}, loss_bbox {float(loss_bbox)})")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ema.update(self.model)
        self.iter += 1
        return {"loss": loss.detach().item(), "loss_cls": loss_cls.detach().item(),
                "loss_bbox": loss_bbox.detach().item(), "lr": lr}

    def run(self, stop_after_epoch: int | None = None) -> dict:
        """Train to `cfg.epochs` (or stop once `stop_after_epoch` epochs are done: a planned interruption,
        after which `--resume` continues exactly where this left off)."""
        cfg = self.cfg
        schedule = LrSchedule.from_config(self.optim_cfg, cfg.epochs, self.iters_per_epoch())
        writer = train_log = val_log = None
        if self.dist.main:
            train_log = CsvLog(self.out / TRAIN_LOG, TRAIN_FIELDS)
            from model.data.coco_eval import STAT_NAMES
            val_log = CsvLog(self.out / VAL_LOG, ("epoch", "iter", *STAT_NAMES))
            writer = _tensorboard(self.out / "tb")
            print(f"training RTMDet-{cfg.size} on {len(self.train_set)} images ({len(self.class_names)} classes), "
                  f"{cfg.epochs} epochs (last {min(cfg.stage2_epochs, cfg.epochs)} weak), batch {cfg.batch_size} x "
                  f"{self.dist.world} process(es), lr {self.base_lr:.3g}, {self.device}, AMP {self.use_amp}",
                  flush=True)
        stats: dict = {}
        try:
            for epoch in range(self.epoch, cfg.epochs):
                self._train_epoch(epoch, schedule, writer, train_log)
                self.epoch = epoch + 1
                due = self.epoch % max(cfg.val_interval, 1) == 0 or self.epoch == cfg.epochs
                if self.dist.main:
                    if due and self.val_set is not None:
                        stats = self.validate()
                        val_log.write({"epoch": self.epoch, "iter": self.iter, **stats})
                        if writer is not None:
                            for k, v in stats.items():
                                writer.add_scalar(f"val/{k}", v, self.iter)
                        print(f"epoch {self.epoch}: mAP {stats['AP']:.4f} AP50 {stats['AP50']:.4f} "
                              f"AP75 {stats['AP75']:.4f}", flush=True)
                        if stats["AP"] > self.best_ap:
                            self.best_ap = stats["AP"]
                            self.save(self.out / "best.pth", training_state=False)
                    if self.epoch % max(cfg.save_interval, 1) == 0 or self.epoch == cfg.epochs:
                        self.save(self.out / "last.pth")
                if self.dist.world > 1:
                    dist.barrier()
                if stop_after_epoch is not None and self.epoch >= stop_after_epoch:
                    if self.dist.main and self.epoch % max(cfg.save_interval, 1) != 0:
                        self.save(self.out / "last.pth")
                    break
        except DataLoaderStalled as e:
            # The run cannot go on; say so with what the user needs to continue it. Nothing of this epoch was
            # written, so the last checkpoint is the one a resumed run starts from.
            last = self.out / "last.pth"
            where = f"{last} (epoch {self.epoch}), continue with --resume" if last.is_file() else \
                "no checkpoint written yet"
            raise DataLoaderStalled(f"{e} at epoch {self.epoch + 1}; last checkpoint: {where}") from e
        finally:
            if writer is not None:
                writer.close()
            self.loader = None
        if self.dist.main:
            from model.train.plots import plot_training
            plot_training(self.out)
        return {"epoch": self.epoch, "iter": self.iter, "best_ap": self.best_ap, "last_val": stats}

    def _train_epoch(self, epoch: int, schedule: LrSchedule, writer, train_log: CsvLog | None) -> None:
        loader = self._loader_for(epoch)
        self.net.train()
        bar = None
        if self.dist.main and self.cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{self.cfg.epochs} (stage {self.stage_of(epoch)})",
                       dynamic_ncols=True, leave=True)
        window: list[dict] = []
        t_last = time.perf_counter()
        for imgs, boxes, labels in batches(loader, self.stage_of(epoch)):
            window.append(self.train_step(imgs, boxes, labels, schedule) | {"n": imgs.shape[0] * self.dist.world})
            if bar is not None:
                bar.update(1)
            if len(window) >= self.cfg.log_interval or self.iter % len(loader) == 0:
                now = time.perf_counter()
                row = {k: sum(w[k] for w in window) / len(window) for k in ("loss", "loss_cls", "loss_bbox")}
                row |= {"lr": window[-1]["lr"], "imgs_per_s": sum(w["n"] for w in window) / max(now - t_last, 1e-9),
                        "epoch": epoch + 1, "iter": self.iter, "time": round(time.time(), 3)}
                t_last, window = now, []
                if bar is not None:
                    bar.set_postfix(loss=f"{row['loss']:.3f}", cls=f"{row['loss_cls']:.3f}",
                                    bbox=f"{row['loss_bbox']:.3f}", lr=f"{row['lr']:.2e}",
                                    img_s=f"{row['imgs_per_s']:.1f}")
                if train_log is not None:
                    # 6 significant digits for the measurements; the wall-clock time keeps its milliseconds.
                    train_log.write({k: (f"{v:.6g}" if isinstance(v, float) and k != "time" else v)
                                     for k, v in row.items()})
                if writer is not None:
                    for k in ("loss", "loss_cls", "loss_bbox", "lr", "imgs_per_s"):
                        writer.add_scalar(f"train/{k}", row[k], self.iter)
        if bar is not None:
            bar.close()

    def validate(self) -> dict[str, float]:
        return evaluate_model(self.ema.module, self.val_set, self.cfg.img_size, self.device,
                              self.cfg.val_batch_size, self.cfg.max_val_images)

    # ----------------------------------------------------------------------------------------- checkpoints
    def meta(self) -> dict:
        return make_meta(self.class_names, size=self.cfg.size, img_size=self.cfg.img_size, epoch=self.epoch,
                         iter=self.iter, best_ap=self.best_ap)

    def save(self, path: Path, training_state: bool = True) -> None:
        """EMA weights as `state_dict`; with `training_state`, everything `--resume` needs. Atomic."""
        extra: dict = {}
        if training_state:
            raw = {f"module.{k}": v for k, v in standard_layout(self.model.state_dict()).items()}
            raw["steps"] = torch.tensor(self.ema.steps, dtype=torch.int64)
            extra = {"ema_state_dict": raw, "optimizer": self.optimizer.state_dict(),
                     "scheduler": {"iter": self.iter, "base_lr": self.base_lr, "total_batch": self.total_batch},
                     "epoch": self.epoch, "iter": self.iter, "best_ap": self.best_ap, "rng": rng_state(),
                     "train_config": {k: v for k, v in asdict(self.cfg).items() if v is not None}}
            if self.use_amp:
                extra["grad_scaler"] = self.scaler.state_dict()
        save_checkpoint(path, self.ema.module.state_dict(), self.meta(), **extra)

    def _load_weights(self, path: str) -> None:
        path = str(model_zoo.resolve_weights(path, kind="detector", size=self.cfg.size, progress=self.dist.main))
        state, _ = read_checkpoint(path, self.cfg.load_from_key)
        fresh = _init_from(self.model, state, source=path)
        self.ema.module.load_state_dict(self.model.state_dict())
        if self.dist.main:
            note = f" ({len(fresh)} classification tensors re-initialised for {self.model.num_classes} classes)" \
                if fresh else ""
            print(f"initialised from {path}{note}", flush=True)

    def _load_backbone(self, spec: str) -> None:
        from model.backbone_weights import load_backbone_weights

        path = model_zoo.resolve_weights(spec, size=self.cfg.size, progress=self.dist.main)
        report = load_backbone_weights(self.model, path)
        self.ema.module.load_state_dict(self.model.state_dict())
        if self.dist.main:
            print(report.describe(), flush=True)

    def _resume(self) -> None:
        path = self.out / "last.pth"
        if not path.is_file():
            raise FileNotFoundError(f"--resume: {path} does not exist")
        ema_weights, _ = read_checkpoint(path)
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        raw = {k[len("module."):]: v for k, v in ckpt["ema_state_dict"].items() if k.startswith("module.")}
        self.model.load_state_dict(raw)
        self.ema.module.load_state_dict(ema_weights)
        self.ema.steps = int(ckpt["ema_state_dict"]["steps"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.use_amp and "grad_scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["grad_scaler"])
        self.epoch, self.iter, self.best_ap = int(ckpt["epoch"]), int(ckpt["iter"]), float(ckpt["best_ap"])
        set_rng_state(ckpt["rng"])
        if self.dist.main:
            print(f"resumed from {path}: epoch {self.epoch}, iteration {self.iter}", flush=True)


def _init_from(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> list[str]:
    """Copy `state` into `model`; the classification convs may differ in class count (COCO weights fine-tuned
    on another label set) and then keep their fresh initialisation. Returns the keys left fresh."""
    own = model.state_dict()
    fresh = [k for k, v in own.items()
             if k.startswith("bbox_head.rtm_cls.") and k in state and state[k].shape != v.shape]
    load_state_dict_strict(model, {**state, **{k: own[k] for k in fresh}}, source=source)
    return fresh


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a missing one should not stop training
        return None
    return SummaryWriter(str(path))


def train(cfg: TrainConfig) -> dict:
    return Trainer(cfg).run()

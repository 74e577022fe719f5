#!/usr/bin/env python3
"""Train RTMDet-tiny step for step with MMDetection 3.3.0's own Runner and with this project's Trainer; compare.

    .venv/bin/python tools/mmdet_train_parity.py [--save-fixture] [--threads 2] [--dtype float32]

Both sides start from the same weights (`model.testing.fill_trainable(seed)`) and see the same fixed batches
(synthetic shapes letterboxed to 128 x 128, no augmentation, the same order every epoch). MMDetection runs
`Runner.train()` with the official config's model, `optim_wrapper` (AdamW, wd 0.05, norm and bias decay 0,
bypass_duplicate), its two `param_scheduler`s (LinearLR warm-up, CosineAnnealingLR by epoch converted to
iterations) and its custom hooks (EMAHook with ExpMomentumEMA momentum 0.0002 and update_buffers,
PipelineSwitchHook), the numbers shrunk to 12 epochs of 3 iterations; ours runs `model.train.replay.replay`
(the Trainer's own step, optimiser, schedule and EMA). The lr is the official 0.004 scaled to the batch of 4
(the linear rule both trainers use; 0.004 itself at batch 4 only makes both runs chaotic).

Both run in float64 by default: in float32 two correct trainers drift apart (their summation orders differ by
1e-7; the network and the assigner's top-k amplify it, and by iteration ~10 the losses no longer agree at
all, `--dtype float32` shows it). In float64 a real difference stands out by many orders of magnitude.

Printed: per-iteration lr and losses of both, the worst differences, and how far the final raw and EMA weights
are apart. With --save-fixture it writes tests/data/parity/train_loop_tiny.pt, the reference that
tests/model/train/test_loop_parity.py checks our side against without MMDetection.

MMDetection needs its own venv ($MMDET_VENV or /tmp/mmdet-ref-venv, built by ../shared/tools/mmdet_ref.py);
mmcv-lite lacks compiled ops and training RTMDet needs none (bench/mmdet_model.py replaces them by ones
that raise). This is a developer tool, not part of the test suite.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MMDET_PY = os.path.join(os.environ.get("MMDET_VENV", "/tmp/mmdet-ref-venv"), "bin", "python")
FIXTURE = ROOT / "tests" / "data" / "parity" / "train_loop_tiny.pt"

# 12 images in batches of 4 (3 iterations an epoch) for 12 epochs = 36 iterations; warm-up over the first 10,
# flat, cosine from epoch 6 (iteration 18) to the end; the weak pipeline for the last 2 epochs.
PLAN = {"epochs": 12, "stage2_epochs": 2, "warmup_iters": 10, "batch_size": 4, "lr": 0.004 * 4 / 256,
        "size": "tiny", "dtype": "float64"}
N_IMAGES, IMG, SEED, CLASSES = 12, 128, 0, ("circle", "square", "triangle")
OFFICIAL_LR = 0.004


# ------------------------------------------------------------------------------------------- the MMDetection side
def mmdet_child(inp: str, out: str, threads: int) -> None:  # runs inside the MMDetection venv
    import torch
    if threads:
        torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT / "bench"))
    from mmdet.registry import DATASETS
    from mmdet.structures import DetDataSample
    from mmdet_model import official_config
    from mmengine.hooks import Hook
    from mmengine.runner import Runner
    from mmengine.structures import InstanceData

    data = torch.load(inp, weights_only=True)
    plan = data["plan"]
    cfg = official_config(plan["size"])  # also registers mmdet's modules and the mmcv._ext stand-in

    # mmengine asks whether full mmcv (compiled ops, its own SyncBN and DCN) is there by finding a loader for
    # mmcv._ext, which fails on the stand-in module; the answer is no (mmcv-lite), wherever the question is asked.
    from mmengine.utils.dl_utils import mmcv_full_available
    for module in list(sys.modules.values()):
        if getattr(module, "mmcv_full_available", None) is mmcv_full_available:
            module.mmcv_full_available = lambda: False
    if plan["dtype"] != "float32":
        # The assigner and the target builder store matched IoUs and box targets in float32 tensors (the priors'
        # dtype) whatever the predictions' dtype (a no-op in a float32 run); let them keep the run's precision.
        from mmdet.models.dense_heads import rtmdet_head
        from mmdet.models.task_modules.assigners import dynamic_soft_label_assigner
        _patch_source(dynamic_soft_label_assigner, "DynamicSoftLabelAssigner", "assign",
                      [("dtype=torch.float32)", "dtype=matched_pred_ious.dtype)", 1)])
        _patch_source(rtmdet_head, "RTMDetHead", "_get_targets_single",
                      [("dtype=torch.float)", "dtype=bbox_preds.dtype)", 2),
                       ("torch.zeros_like(anchors)", "torch.zeros_like(anchors, dtype=bbox_preds.dtype)", 1)])

    @DATASETS.register_module(force=True)
    class FixedBatches(torch.utils.data.Dataset):
        """The prepared images in order; `pipeline` is only there for PipelineSwitchHook to replace."""

        def __init__(self, path: str) -> None:
            d = torch.load(path, weights_only=True)
            self.images, self.boxes, self.labels = d["images"], d["boxes"], d["labels"]
            self.pipeline = "stage 1"
            self.metainfo = {"classes": tuple(d["class_names"])}

        def __len__(self) -> int:
            return len(self.images)

        def __getitem__(self, i: int) -> dict:
            img = self.images[i]
            h, w = img.shape[:2]
            sample = DetDataSample(metainfo={"img_id": i, "img_shape": (h, w), "ori_shape": (h, w),
                                             "scale_factor": (1.0, 1.0)})
            # In the run's precision: GT-only arithmetic (centres, areas) would otherwise stay in float32.
            sample.gt_instances = InstanceData(bboxes=self.boxes[i].to(getattr(torch, plan["dtype"])),
                                               labels=self.labels[i].clone())
            return {"inputs": img.permute(2, 0, 1).contiguous(), "data_samples": sample}

    def ema_of(runner):
        return next(h for h in runner.hooks if type(h).__name__ == "EMAHook").ema_model

    class ToDtype(Hook):
        """The model in the run's float type, in place, before EMAHook copies it; the data preprocessor's mean
        and std go with it, so the input is normalised in that precision too."""
        priority = "VERY_HIGH"

        def before_run(self, runner) -> None:
            runner.model.to(getattr(torch, plan["dtype"]))

    class Record(Hook):
        priority = "LOWEST"  # after the EMA update and the lr scheduler step

        def __init__(self) -> None:
            self.rows: list[dict] = []
            self.lr = 0.0

        def before_train(self, runner) -> None:
            # load_from loads non-strictly: make sure every weight (and the EMA copy) is the one we gave.
            init = data["init_state"]
            for name, module in (("model", runner.model), ("ema", ema_of(runner).module)):
                state = module.state_dict()
                assert set(state) == set(init), f"{name}: keys differ from the initial weights"
                bad = [k for k in init if not torch.equal(state[k], init[k].to(state[k].dtype))]
                assert not bad, f"{name}: not loaded from the initial weights: {bad[:5]}"

        def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
            lrs = {g["lr"] for g in runner.optim_wrapper.optimizer.param_groups}
            assert len(lrs) == 1, lrs
            self.lr = lrs.pop()

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
            switched = runner.train_dataloader.dataset.pipeline != "stage 1"
            self.rows.append({"epoch": runner.epoch, "stage": 2 if switched else 1, "lr": self.lr,
                              **{k: float(outputs[k].detach()) for k in ("loss", "loss_cls", "loss_bbox")}})

    model = cfg.model
    model.bbox_head.num_classes = len(data["class_names"])
    model.backbone.init_cfg = None  # the weights come from load_from
    epochs = plan["epochs"]
    warmup, cosine = cfg.param_scheduler
    assert warmup.type == "LinearLR" and not warmup.by_epoch and cosine.type == "CosineAnnealingLR", cfg.param_scheduler
    assert cfg.optim_wrapper.optimizer.lr == OFFICIAL_LR and cosine.eta_min == 0.05 * OFFICIAL_LR
    # The config derives both from `base_lr` (eta_min=base_lr * 0.05): a smaller base_lr moves both.
    cfg.optim_wrapper.optimizer.lr, cosine.eta_min = plan["lr"], 0.05 * plan["lr"]
    warmup.end = plan["warmup_iters"]
    cosine.begin, cosine.end, cosine.T_max = epochs // 2, epochs, epochs - epochs // 2  # max_epochs // 2 ... max
    ema_hook, switch_hook = cfg.custom_hooks
    assert ema_hook.type == "EMAHook" and switch_hook.type == "PipelineSwitchHook", cfg.custom_hooks
    switch_hook.switch_epoch = epochs - plan["stage2_epochs"]

    with tempfile.TemporaryDirectory() as work:
        ckpt = os.path.join(work, "init.pth")
        torch.save({"state_dict": data["init_state"], "meta": {}}, ckpt)
        batches = os.path.join(work, "batches.pt")
        torch.save({k: data[k] for k in ("images", "boxes", "labels", "class_names")}, batches)
        runner = Runner(
            model=model, work_dir=work, default_scope="mmdet", launcher="none",
            train_dataloader={"batch_size": plan["batch_size"], "num_workers": 0,
                              "sampler": {"type": "DefaultSampler", "shuffle": False},
                              "collate_fn": {"type": "pseudo_collate"},
                              "dataset": {"type": "FixedBatches", "path": batches}},
            train_cfg={"type": "EpochBasedTrainLoop", "max_epochs": epochs, "val_interval": epochs + 1},
            optim_wrapper=cfg.optim_wrapper, param_scheduler=cfg.param_scheduler, custom_hooks=cfg.custom_hooks,
            default_hooks={"timer": {"type": "IterTimerHook"}, "logger": {"type": "LoggerHook", "interval": 1000},
                           "param_scheduler": {"type": "ParamSchedulerHook"}, "checkpoint": None,
                           "sampler_seed": {"type": "DistSamplerSeedHook"}},
            load_from=ckpt, randomness={"seed": 0})
        record = Record()
        runner.register_hook(record)
        runner.register_hook(ToDtype())
        runner.train()
        ema = ema_of(runner)
        names = {id(p): k for k, p in runner.model.named_parameters()}
        opt = runner.optim_wrapper.optimizer
        weight_decay = {names[id(p)]: float(g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
        torch.save({"rows": record.rows, "raw": runner.model.state_dict(), "ema": ema.module.state_dict(),
                    "ema_steps": int(ema.steps), "weight_decay": weight_decay,
                    "optimizer_defaults": {"type": type(opt).__name__,
                                           **{k: opt.defaults[k] for k in ("betas", "eps", "amsgrad")}}}, out)


def _patch_source(module, cls_name: str, method: str, edits: list[tuple[str, str, int]]) -> None:
    """Re-define `module.cls_name.method` from its source with each `old` replaced by `new` (found `count` times)."""
    import inspect
    import textwrap
    cls = getattr(module, cls_name)
    src = textwrap.dedent(inspect.getsource(getattr(cls, method)))
    for old, new, count in edits:
        assert src.count(old) == count, f"{cls_name}.{method} changed ({old!r}); revisit this patch"
        src = src.replace(old, new)
    scope = dict(vars(module))
    exec(compile(src, inspect.getsourcefile(cls), "exec"), scope)
    setattr(cls, method, scope[method])


# ------------------------------------------------------------------------------------------- our side
def initial_weights(seed: int = SEED):
    from model import build_rtmdet
    from model.testing import fill_trainable
    return fill_trainable(build_rtmdet(PLAN["size"], num_classes=len(CLASSES)), seed).state_dict()


def make_batches(seed: int = SEED):
    """N_IMAGES synthetic shapes images letterboxed to IMG x IMG (uint8 BGR) with their boxes in that canvas."""
    import dataclasses

    import numpy as np
    import torch

    from model.data.shapes import SHAPE_CLASSES, ShapesConfig, draw_shapes_image
    from model.inference.preprocess import letterbox
    assert tuple(SHAPE_CLASSES[:len(CLASSES)]) == CLASSES, SHAPE_CLASSES
    cfg = dataclasses.replace(ShapesConfig(), img_size=IMG)
    images, boxes, labels = [], [], []
    i = 0
    while len(images) < N_IMAGES:
        rng = np.random.default_rng([seed, 7, i])
        i += 1
        img, objects = draw_shapes_image(rng, cfg, photos=[])
        objects = [o for o in objects if o.label < len(CLASSES)]
        if not objects:
            continue
        canvas, info = letterbox(img, IMG)
        scale = np.array([info.scale_w, info.scale_h, info.scale_w, info.scale_h], np.float32)
        images.append(torch.from_numpy(canvas))
        boxes.append(torch.from_numpy(np.stack([o.box * scale for o in objects]).astype(np.float32)))
        labels.append(torch.tensor([o.label for o in objects], dtype=torch.int64))
    return torch.stack(images), boxes, labels


# ------------------------------------------------------------------------------------------- the parent
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--save-fixture", action="store_true", help=f"write {FIXTURE.relative_to(ROOT)}")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on both sides (0: torch default)")
    ap.add_argument("--dtype", default=PLAN["dtype"], choices=["float32", "float64"])
    ap.add_argument("--lr", type=float, default=PLAN["lr"], help="lr after warm-up, for the batch of 4")
    ap.add_argument("--mmdet-child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.mmdet_child:
        mmdet_child(*a.mmdet_child, a.threads)
        return 0
    sys.path.insert(0, str(ROOT))
    import torch

    from model.train.replay import ReplayPlan, digest, replay
    if a.threads:
        torch.set_num_threads(a.threads)
    plan = PLAN | {"dtype": a.dtype, "lr": a.lr}
    if a.save_fixture and plan != PLAN:
        raise SystemExit("--save-fixture stores the default plan only")
    init = initial_weights()
    images, boxes, labels = make_batches()
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = os.path.join(tmp, "in.pt"), os.path.join(tmp, "out.pt")
        torch.save({"plan": plan, "init_state": init, "images": images, "boxes": boxes, "labels": labels,
                    "class_names": list(CLASSES)}, inp)
        subprocess.check_call([MMDET_PY, os.path.abspath(__file__), "--mmdet-child", inp, out,
                               "--threads", str(a.threads)])
        ref = torch.load(out, weights_only=True)
        ours = replay(images, boxes, labels, list(CLASSES), init, ReplayPlan(**plan), Path(tmp, "ours"))
    report(ref, ours)
    if a.save_fixture:
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"plan": plan, "seed": SEED, "class_names": list(CLASSES), "images": images, "boxes": boxes,
                    "labels": labels, "init_digest": digest(init, full_numel=0, n_samples=64), "rows": ref["rows"],
                    "raw": digest(ref["raw"]), "ema_minus_raw": digest(ema_minus_raw(ref["raw"], ref["ema"])),
                    "ema_steps": ref["ema_steps"],
                    "weight_decay": ref["weight_decay"], "optimizer_defaults": ref["optimizer_defaults"]}, FIXTURE)
        print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size / 1e6:.2f} MB)")
    return 0


def ema_minus_raw(raw: dict, ema: dict) -> dict:
    """EMA weights as their difference from the raw ones (integer buffers as they are). The difference is small
    (the EMA follows closely at these momenta), so it shows the EMA rule itself, not the shared trajectory."""
    return {k: ema[k] - raw[k] if ema[k].is_floating_point() else ema[k] for k in ema}


def report(ref: dict, ours) -> None:
    import torch
    print("iter epoch stage |      lr mmdet / ours      |       loss_cls mmdet / ours       |"
          "       loss_bbox mmdet / ours")
    worst = {"lr": 0.0, "loss_cls": 0.0, "loss_bbox": 0.0}
    for i, (r, o) in enumerate(zip(ref["rows"], ours.rows, strict=True)):
        print(f"{i:4d} {r['epoch']:3d}/{o['epoch']:<3d} {r['stage']}/{o['stage']} | {r['lr']:.6e} {o['lr']:.6e} | "
              f"{r['loss_cls']:.12f} {o['loss_cls']:.12f} | {r['loss_bbox']:.12f} {o['loss_bbox']:.12f}")
        for k in worst:
            worst[k] = max(worst[k], abs(r[k] - o[k]) / abs(r[k]))
    print("worst relative difference in one iteration: " + ", ".join(f"{k} {v:.3g}" for k, v in worst.items()))
    ref_delta, our_delta = ema_minus_raw(ref["raw"], ref["ema"]), ema_minus_raw(ours.raw, ours.ema)
    for name, a, b in (("raw", ref["raw"], ours.raw), ("ema", ref["ema"], ours.ema),
                       ("ema - raw", ref_delta, our_delta)):
        floats = [k for k in a if a[k].is_floating_point()]
        rel = {k: float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp(min=1e-30)) for k in floats}
        k_worst = max(rel, key=rel.get)
        ints = [k for k in a if not a[k].is_floating_point() and not torch.equal(a[k], b[k])]
        print(f"{name} weights: worst max|mmdet - ours| / max|mmdet| = {rel[k_worst]:.3g} ({k_worst}); "
              f"integer buffers that differ: {len(ints)} {ints[:2]}"
              + (f" (mmdet {int(a[ints[0]])}, ours {int(b[ints[0]])})" if ints else ""))
    wd_diff = [k for k in ref["weight_decay"] if ref["weight_decay"][k] != ours.weight_decay.get(k)]
    print(f"weight decay per parameter: {len(ref['weight_decay'])} in MMDetection, {len(ours.weight_decay)} ours, "
          f"{len(wd_diff)} differ {wd_diff[:5]}; EMA steps {ref['ema_steps']} / {ours.ema_steps}; "
          f"optimizer {ref['optimizer_defaults']} / {ours.optimizer_defaults}")


if __name__ == "__main__":
    sys.exit(main())

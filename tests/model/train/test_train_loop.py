"""The training program end to end on tiny synthetic sets: checkpoints, resume, DDP, eval CLI, plots."""
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model.checkpoint import class_names_from_meta
from model.inference.detector import Detector
from model.train.engine import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[3]


def _cfg(data, out, **kw):
    base = dict(data=str(data), out=str(out), size="tiny", epochs=2, batch_size=4, img_size=96, stage2_epochs=2,
                workers=0, val_interval=100, warmup_iters=3, log_interval=1, threads=1, progress=False)
    base.update(kw)
    return TrainConfig(**base)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_equals_uninterrupted_run(shapes, tmp_path):
    Trainer(_cfg(shapes, tmp_path / "straight")).run()
    Trainer(_cfg(shapes, tmp_path / "split")).run(stop_after_epoch=1)
    first = _load(tmp_path / "split" / "last.pth")
    assert first["epoch"] == 1 and first["iter"] == 2
    Trainer(_cfg(shapes, tmp_path / "split", resume=True)).run()

    a, b = _load(tmp_path / "straight" / "last.pth"), _load(tmp_path / "split" / "last.pth")
    assert a["epoch"] == b["epoch"] == 2 and a["iter"] == b["iter"] == 4
    for key in ("state_dict", "ema_state_dict"):  # EMA weights, raw weights (+ EMA steps)
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        for k in sa:
            assert torch.equal(sa[k], sb[k])
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    # The model really trained: weights moved away from the first epoch's.
    assert not torch.equal(first["ema_state_dict"]["module.bbox_head.rtm_reg.0.weight"],
                           b["ema_state_dict"]["module.bbox_head.rtm_reg.0.weight"])
    rows = list(csv.DictReader((tmp_path / "split" / "train_log.csv").open()))
    assert [int(r["iter"]) for r in rows] == [1, 2, 3, 4]  # the resumed run appends to the same log
    times = [float(r["time"]) for r in rows]
    assert times == sorted(times) and abs(times[-1] - time.time()) < 600  # wall-clock seconds, not rounded away


def test_checkpoints_are_official_format_and_serve(shapes, tmp_path):
    out = tmp_path / "run"
    Trainer(_cfg(shapes, out, epochs=1, stage2_epochs=0, val_interval=1)).run()  # stage 1: Mosaic + MixUp
    names = json.loads((shapes / "annotations" / "instances_train.json").read_text())["categories"]
    for name in ("last.pth", "best.pth"):
        ck = _load(out / name)
        assert class_names_from_meta(ck["meta"]) == [c["name"] for c in sorted(names, key=lambda c: c["id"])]
        assert len(ck["state_dict"]) == 476  # the official key set, aliases included
        # The network trains in channels_last; what it writes is the official contiguous layout, and the head's
        # convs shared across levels are still one tensor (not three copies).
        for key in ("state_dict", "ema_state_dict") if name == "last.pth" else ("state_dict",):
            assert all(v.is_contiguous() for v in ck[key].values()), key
        shared = [ck["state_dict"][f"bbox_head.cls_convs.{level}.0.conv.weight"] for level in (0, 2)]
        assert shared[0].data_ptr() == shared[1].data_ptr()
    assert set(_load(out / "best.pth")) == {"meta", "state_dict"}  # publishable as is
    det = Detector.from_checkpoint(out / "best.pth", size="tiny", device="cpu")
    assert det.class_names == class_names_from_meta(_load(out / "best.pth")["meta"])
    assert (out / "loss.png").stat().st_size > 0 and (out / "map.png").stat().st_size > 0
    assert len(list(csv.DictReader((out / "val_log.csv").open()))) == 1
    assert any((out / "tb").iterdir())

    res = subprocess.run([sys.executable, "-m", "service.cli", "eval", "--weights", str(out / "best.pth"),
                          "--data", str(shapes), "--img-size", "96", "--json"], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    assert list(stats) == ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"]
    best = list(csv.DictReader((out / "val_log.csv").open()))[0]
    assert stats["AP"] == pytest.approx(float(best["AP"]), abs=1e-9)  # same pipeline inside and outside training


def test_two_process_ddp_on_cpu(shapes, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           "-m", "service.cli", "train", "--data", str(shapes), "--epochs", "2", "--batch-size", "2",
           "--img-size", "96", "--stage2-epochs", "1", "--out", str(out), "--workers", "0", "--warmup-iters", "2",
           "--log-interval", "1", "--val-interval", "100", "--threads", "1", "--no-progress"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                         env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = list(csv.DictReader((out / "train_log.csv").open()))
    # 8 images over 2 ranks, 2 per batch: 2 iterations per epoch, logged once (rank 0 only).
    assert [int(r["iter"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["lr"]) <= 0.004 * 4 / 256 + 1e-12  # lr scaled for the total batch of 2 x 2
    # Warm-up over 2 iterations as mmengine's LinearLR(end=2): the start factor, then the full lr.
    assert float(rows[0]["lr"]) == pytest.approx(0.004 * 4 / 256 * 1e-5, rel=1e-4)
    assert float(rows[1]["lr"]) == pytest.approx(0.004 * 4 / 256, rel=1e-4)
    ck = _load(out / "last.pth")
    assert ck["iter"] == 4 and int(ck["ema_state_dict"]["steps"]) == 4
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())
    assert res.stdout.count("training RTMDet-tiny") == 1  # rank 0 alone prints


def test_load_from_starts_a_fresh_schedule_on_given_weights(shapes, tmp_path):
    Trainer(_cfg(shapes, tmp_path / "first", epochs=1)).run()
    source = _load(tmp_path / "first" / "last.pth")["state_dict"]

    trainer = Trainer(_cfg(shapes, tmp_path / "tuned", load_from=str(tmp_path / "first" / "last.pth")))
    assert trainer.epoch == 0 and trainer.iter == 0  # weights only: no optimizer state, epoch or iteration
    for name, state in (("model", trainer.model.state_dict()), ("ema", trainer.ema.module.state_dict())):
        for k, v in source.items():
            assert torch.equal(state[k], v), (name, k)


def test_load_from_with_another_class_count_keeps_fresh_classifiers(shapes, tmp_path):
    from model.checkpoint import save_checkpoint
    from model.nn.rtmdet import build_rtmdet

    torch.manual_seed(3)
    coco = build_rtmdet("tiny", num_classes=80).state_dict()  # an "official" 80-class checkpoint
    save_checkpoint(tmp_path / "coco.pth", coco)
    trainer = Trainer(_cfg(shapes, tmp_path / "tuned", load_from=str(tmp_path / "coco.pth")))
    state = trainer.model.state_dict()
    assert state["bbox_head.rtm_cls.0.weight"].shape[0] == trainer.model.num_classes != 80
    loaded = [k for k in coco if not k.startswith("bbox_head.rtm_cls.")]
    assert all(torch.equal(state[k], coco[k]) for k in loaded)


def test_load_from_rejects_weights_of_another_size(shapes, tmp_path):
    from model.checkpoint import CheckpointError, save_checkpoint
    from model.nn.rtmdet import build_rtmdet

    save_checkpoint(tmp_path / "s.pth", build_rtmdet("s", num_classes=80).state_dict())
    with pytest.raises(CheckpointError, match="s.pth"):
        Trainer(_cfg(shapes, tmp_path / "tuned", load_from=str(tmp_path / "s.pth")))


@pytest.mark.slow  # inductor compiles the forward and backward graphs: about two minutes on 2 cores
def test_compiled_training_takes_the_eager_steps(shapes, tmp_path):
    from model.train.schedule import LrSchedule

    trainers = {name: Trainer(_cfg(shapes, tmp_path / name, compile=compiled))
                for name, compiled in (("eager", False), ("compiled", True))}
    batch = next(iter(trainers["eager"]._loader_for(0)))
    initial = {k: v.detach().clone() for k, v in trainers["eager"].model.named_parameters()}
    schedule = LrSchedule(total_iters=10, warmup_iters=0)
    first = {name: t.train_step(*batch, schedule) for name, t in trainers.items()}
    # Same initial weights, same batch: inductor's fused kernels reorder float32 sums (3e-4 relative in the loss).
    assert first["compiled"]["loss"] == pytest.approx(first["eager"]["loss"], rel=1e-3)
    grads = dict(trainers["compiled"].model.named_parameters())
    for name, p in trainers["eager"].model.named_parameters():  # measured: at most 0.5% (BN weights)
        rel = float((grads[name].grad - p.grad).norm() / p.grad.norm().clamp_min(1e-12))
        assert rel < 0.02, (name, rel)
    second = {name: t.train_step(*batch, schedule) for name, t in trainers.items()}
    assert second["compiled"]["loss"] == pytest.approx(second["eager"]["loss"], rel=1e-2)
    # AdamW moves each weight by about lr per step (sign of its gradient): both moved alike.
    lr = trainers["eager"].base_lr
    after = dict(trainers["compiled"].model.named_parameters())
    for name, p in trainers["eager"].model.named_parameters():
        assert float((p - initial[name]).abs().max()) > 0.5 * lr, name
        assert float((after[name] - p).abs().max()) <= 4 * lr, name
    for t in trainers.values():
        t.save(t.out / "last.pth")
    eager, compiled = _load(tmp_path / "eager" / "last.pth"), _load(tmp_path / "compiled" / "last.pth")
    assert compiled["state_dict"].keys() == eager["state_dict"].keys()  # no `_orig_mod.` prefixes
    assert compiled["ema_state_dict"].keys() == eager["ema_state_dict"].keys()

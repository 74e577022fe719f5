"""Overfitting a few images: the loss falls and COCO mAP on those same images rises well above zero.

Training on one fixed batch normalises every BatchNorm with that batch's own statistics (biased variance), and
that is the function the loss fits. Evaluation uses the running statistics instead, which lag (momentum 0.03)
and hold the unbiased variance: with 2 images of 128 px the stride-32 maps have 2 x 4 x 4 = 32 values per
channel, and the 32/31 on the variance alone took the loss on the same batch from 0.36 (train mode) to 0.76
(eval mode) after 80 steps, AP 0.35 -> 0.13. The fitted network is that sensitive, so its AP with running
statistics is chaotic across CPUs (AP 0.256 on Intel, 0.143 on AMD EPYC, same code). The test therefore
evaluates, through the whole real pipeline, a copy whose BatchNorms hold exactly the batch statistics training
normalised with: on the training batch its eval-mode output is the train-mode output training fitted.
"""
import copy
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from model.data.shapes import make_shapes_dataset
from model.inference.preprocess import letterbox
from model.train.engine import TrainConfig, Trainer
from model.train.evaluate import evaluate_model
from model.train.schedule import LrSchedule


def _same_images_as_val(root):
    shutil.copy(root / "annotations" / "instances_train.json", root / "annotations" / "instances_val.json")
    shutil.rmtree(root / "val", ignore_errors=True)
    shutil.copytree(root / "train", root / "val")


def _fixed_batch(dataset, img_size):
    """The images letterboxed exactly as evaluation sees them, boxes scaled alike: no augmentation."""
    imgs, boxes, labels = [], [], []
    for i in range(len(dataset)):
        s = dataset[i]
        canvas, info = letterbox(s.img, img_size)
        imgs.append(canvas)
        boxes.append(torch.from_numpy(s.boxes * np.array([info.scale_w, info.scale_h] * 2, np.float32)))
        labels.append(torch.from_numpy(s.labels))
    return torch.from_numpy(np.stack(imgs)), boxes, labels


def _with_batch_statistics(model, x):
    """An eval-mode copy of `model` whose BatchNorms hold the statistics of batch `x` as training mode uses them
    (mean and biased variance), so that in eval mode it computes on `x` what training mode computes."""
    model = copy.deepcopy(model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]

    def set_stats(bn, inputs):
        bn.running_mean.copy_(inputs[0].mean((0, 2, 3)))
        bn.running_var.copy_(inputs[0].var((0, 2, 3), unbiased=False))

    hooks = [bn.register_forward_pre_hook(set_stats) for bn in bns]
    for bn in bns:
        bn.momentum = 0.0  # training-mode forward below leaves the running statistics as set_stats wrote them
    model.train()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return model.eval()


def _overfit(tmp_path, n_images, img_size, steps, lr):
    root = tmp_path / "data"
    make_shapes_dataset(root, n_images, 0, seed=2, img_size=img_size)
    _same_images_as_val(root)
    cfg = TrainConfig(data=str(root), out=str(tmp_path / "run"), epochs=1, batch_size=n_images, img_size=img_size,
                      stage2_epochs=1, workers=0, warmup_iters=5, threads=1, progress=False)
    trainer = Trainer(cfg)
    trainer.optimizer.param_groups[0]["lr"] = lr
    trainer.base_lr = lr
    schedule = LrSchedule(total_iters=steps, warmup_iters=5, cosine_start=steps)  # warm-up, then flat
    batch = _fixed_batch(trainer.train_set, img_size)
    trainer.net.train()
    losses = [trainer.train_step(*batch, schedule)["loss"] for _ in range(steps)]
    fitted = _with_batch_statistics(trainer.model, trainer.normalizer(batch[0]))
    stats = evaluate_model(fitted, trainer.val_set, img_size, "cpu")
    return losses, stats


def _loss_fell(losses, first, last, factor):
    # QFL's targets are the IoUs of the predicted boxes, near zero at initialisation, so the loss starts low
    # (0.23 here), jumps to its peak within the warm-up (2.2-2.5) and then falls: the fall is measured from that
    # peak. The mean of steps 5-10, used before, sits inside the jump and swings with the chaos (1.3-2.0).
    return np.mean(losses[-last:]) < factor * max(losses[:first])


def test_overfit_few_images(tmp_path):
    # 80 steps on 2 images are chaotic (on Intel, gradients 4e-6 relative apart from the depthwise convs' memory
    # layout moved AP 0.34 -> 0.07 at lr 0.02). At lr 0.005 on AMD EPYC, 8 runs (unperturbed; weights times
    # 1 + 1e-6 noise, 5 seeds; lr times 1 + 1e-5; 2 threads) ended at batch-statistics AP 0.33-0.83, AP50
    # 0.42-1.0, where the running statistics gave AP 0.10-0.69. Broken training (lr 0, the loss's gradient
    # detached, boxes swapped between the two images) ends at AP <= 0.001, AP50 <= 0.005.
    losses, stats = _overfit(tmp_path, n_images=2, img_size=128, steps=80, lr=0.005)
    assert _loss_fell(losses, first=10, last=10, factor=0.5), losses
    assert stats["AP50"] > 0.3 and stats["AP"] > 0.2, stats


@pytest.mark.slow
def test_overfit_more_images_longer(tmp_path):
    losses, stats = _overfit(tmp_path, n_images=8, img_size=192, steps=200, lr=0.005)
    assert _loss_fell(losses, first=15, last=10, factor=0.4), losses
    assert stats["AP"] > 0.4, stats

"""Learning rate and EMA momentum at chosen iterations; AdamW parameter groups."""
import math

import pytest
import torch
from torch import nn

from model import build_rtmdet
from model.train.ema import ExpMomentumEMA
from model.train.schedule import LrSchedule, OptimConfig, build_optimizer, param_groups


def test_official_schedule_at_chosen_iterations():
    # 300 epochs of 100 iterations: warm-up over 1000, flat, cosine from epoch 150 (iteration 15000) to 30000.
    s = LrSchedule.from_config(OptimConfig(), epochs=300, iters_per_epoch=100)
    assert s.factor(0) == pytest.approx(1e-5)
    # mmengine's LinearLR(end=1000) takes 999 steps: full lr from iteration 999 on (not 1000).
    assert s.factor(500) == pytest.approx(1e-5 + (1 - 1e-5) * 500 / 999, rel=1e-12)
    assert s.factor(998) < 1.0
    assert s.factor(999) == 1.0
    assert s.factor(1000) == 1.0
    assert s.factor(14999) == 1.0
    assert s.factor(15000) == pytest.approx(1.0)
    assert s.factor(22500) == pytest.approx(0.05 + 0.95 * 0.5)  # half-way through the cosine
    assert s.factor(30000) == pytest.approx(0.05)  # eta_min 0.0002 = 5% of 0.004
    assert s.factor(15000 + 3750) == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_lr_scales_with_total_batch_and_is_written_into_every_group():
    cfg = OptimConfig()
    assert cfg.scaled_lr(256) == pytest.approx(0.004)
    assert cfg.scaled_lr(32) == pytest.approx(0.0005)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    opt = build_optimizer(model, cfg, total_batch=64)
    s = LrSchedule(total_iters=100, warmup_iters=10, cosine_start=50)
    lr = s.apply(opt, cfg.scaled_lr(64), 5)
    assert lr == pytest.approx(0.001 * (1e-5 + (1 - 1e-5) * 5 / 9))
    assert all(g["lr"] == lr for g in opt.param_groups)


def test_no_weight_decay_on_norms_and_biases():
    model = build_rtmdet("tiny")
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    norm_and_bias = {id(p) for n, p in model.named_parameters() if n.endswith(".bias") or ".bn." in n}
    assert {id(p) for p in no_decay["params"]} == norm_and_bias
    assert all(p.dim() == 4 for p in decay["params"])  # conv kernels only
    # Shared head convs are listed once, so the groups hold exactly the unique parameters.
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == 4_896_168


def test_ema_momentum_and_update_rule():
    model = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = ExpMomentumEMA(model, momentum=0.0002, gamma=2000)
    assert ema.momentum_at(1) == pytest.approx(0.9998 * math.exp(-2 / 2000) + 0.0002)
    assert ema.momentum_at(2000) == pytest.approx(0.9998 * math.exp(-2001 / 2000) + 0.0002)
    assert ema.momentum_at(10**7) == pytest.approx(0.0002)
    ema.update(model)  # step 0 copies
    assert torch.equal(ema.module.weight, model.weight)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)  # step 1: avg = avg * (1 - m) + new * m
    m = ema.momentum_at(1)
    assert torch.allclose(ema.module.weight, torch.full((1, 2), 1.0 * (1 - m) + 3.0 * m))
    assert ema.steps == 2
    state = ema.state_dict()
    assert set(state) == {"module.weight", "steps"} and int(state["steps"]) == 2


def test_ema_averages_bn_buffers_and_shared_convs_once_per_key_as_mmengine():
    model = build_rtmdet("tiny")
    ema = ExpMomentumEMA(model)
    ema.update(model)
    shared = model.bbox_head.cls_convs[0][0].conv.weight
    own = model.bbox_head.rtm_cls[0].weight
    with torch.no_grad():
        shared.add_(1.0)
        own.add_(1.0)
        model.bbox_head.cls_convs[1][0].bn.running_mean.add_(1.0)
        for bn in (model.bbox_head.cls_convs[1][0].bn, model.backbone.stem[0].bn):
            bn.num_batches_tracked.add_(5)
    ema.update(model)
    m = ema.momentum_at(1)
    # mmengine lerps every state_dict key; the shared conv is listed under 3 keys (levels 0, 1, 2), so it
    # moves 1 - (1 - m)^3 of the way; an unshared weight moves m.
    delta = ema.module.bbox_head.cls_convs[2][0].conv.weight - (shared - 1.0)
    assert torch.allclose(delta, torch.full_like(delta, 1 - (1 - m) ** 3), atol=1e-6)
    delta_own = ema.module.bbox_head.rtm_cls[0].weight - (own - 1.0)
    assert torch.allclose(delta_own, torch.full_like(delta_own, m), atol=1e-6)
    assert torch.allclose(ema.module.bbox_head.cls_convs[1][0].bn.running_mean, torch.full((96,), m), atol=1e-6)
    # Integer buffers: copied at the first update only (update_buffers averages floats and skips the rest).
    assert int(ema.module.backbone.stem[0].bn.num_batches_tracked) == 0
    assert int(ema.module.bbox_head.cls_convs[1][0].bn.num_batches_tracked) == 0

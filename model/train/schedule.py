"""AdamW with the official parameter groups, and the official learning-rate curve per iteration.

Official recipe (rtmdet_*_8xb32-300e_coco.py): AdamW lr 0.004 for a total batch of 256, weight decay 0.05
except on norm layers and biases; `LinearLR(start_factor=1e-5, end=1000)`: linear from 1e-5 at iteration 0 to 1
at iteration 999; flat;
then cosine down to 5% of the base lr (0.0002 / 0.004) over the second half of the epochs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

BASE_LR = 0.004
BASE_BATCH = 256


@dataclass(frozen=True)
class OptimConfig:
    base_lr: float = BASE_LR  # for a total batch of BASE_BATCH
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_iters: int = 1000
    warmup_start_factor: float = 1e-5
    min_lr_ratio: float = 0.05  # eta_min 0.0002 of 0.004
    cosine_start_fraction: float = 0.5  # cosine over the second half of training

    def scaled_lr(self, total_batch: int) -> float:
        """Linear scaling rule: lr grows with the real total batch."""
        return self.base_lr * total_batch / BASE_BATCH


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed conv/linear weights; undecayed norm parameters and every bias.

    `model.parameters()` yields a shared parameter once (the head's shared convs), like `bypass_duplicate`.
    """
    no_decay_ids = set()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase | nn.GroupNorm | nn.LayerNorm):
            no_decay_ids.update(id(p) for p in module.parameters(recurse=False))
        bias = getattr(module, "bias", None)
        if isinstance(bias, nn.Parameter):
            no_decay_ids.add(id(bias))
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if id(p) in no_decay_ids else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, total_batch: int) -> torch.optim.AdamW:
    # The fused kernel updates every tensor in one pass: RTMDet-tiny's step on 1 CPU thread takes 13 ms
    # against 40 ms for the per-tensor loop (torch's CPU default), and it is the fastest on CUDA too.
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.scaled_lr(total_batch), betas=cfg.betas,
                             fused=fused or None)


@dataclass(frozen=True)
class LrSchedule:
    """lr multiplier at an iteration: linear warm-up, flat, cosine from `cosine_start` to `total_iters`."""

    total_iters: int
    warmup_iters: int = 1000
    warmup_start_factor: float = 1e-5
    cosine_start: int = 0
    min_ratio: float = 0.05

    @classmethod
    def from_config(cls, cfg: OptimConfig, epochs: int, iters_per_epoch: int) -> LrSchedule:
        total = epochs * iters_per_epoch
        # The official cosine starts at an epoch boundary (epoch 150 of 300), converted to iterations.
        start = int(epochs * cfg.cosine_start_fraction) * iters_per_epoch
        return cls(total, cfg.warmup_iters, cfg.warmup_start_factor, start, cfg.min_lr_ratio)

    def factor(self, it: int) -> float:
        """Multiplier of the base lr for iteration `it` (0-based: the lr used by the it-th update)."""
        f = 1.0
        if it < self.warmup_iters:
            # mmengine's LinearLR(begin=0, end=W) steps W - 1 times: the factor reaches 1 at iteration W - 1.
            f *= self.warmup_start_factor + (1.0 - self.warmup_start_factor) * it / max(self.warmup_iters - 1, 1)
        if it >= self.cosine_start and self.total_iters > self.cosine_start:
            progress = min(1.0, (it - self.cosine_start) / (self.total_iters - self.cosine_start))
            f *= self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return f

    def apply(self, optimizer: torch.optim.Optimizer, base_lr: float, it: int) -> float:
        lr = base_lr * self.factor(it)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

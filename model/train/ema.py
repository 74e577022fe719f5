"""ExpMomentumEMA: the averaged weights that get evaluated and saved.

momentum(step) = (1 - m) * exp(-(1 + step) / gamma) + m, so the average follows the model closely early on
(momentum near 1) and settles to m = 0.0002 later. Buffers (BN running statistics) are averaged too
(`update_buffers=True` in the official config).

Two details follow mmengine's `BaseAveragedModel` with `update_buffers=True`, which walks the state_dict
(checked step for step by tools/mmdet_train_parity.py):
- a tensor listed under several keys (the head's convs shared across levels: 3 keys each) is averaged once
  per key, so its momentum per step is 1 - (1 - m)^3;
- integer buffers (BN `num_batches_tracked`) are copied at the first update only and then left alone.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


class ExpMomentumEMA:
    def __init__(self, model: nn.Module, momentum: float = 0.0002, gamma: float = 2000.0) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.momentum = momentum
        self.gamma = gamma
        self.steps = 0

    def momentum_at(self, step: int) -> float:
        return (1 - self.momentum) * math.exp(-float(1 + step) / self.gamma) + self.momentum

    @staticmethod
    def _unique_state(module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """Each tensor once (under its first key), and how many keys name it."""
        first: dict[int, str] = {}
        out, keys = {}, {}
        for k, v in module.state_dict(keep_vars=False).items():
            name = first.setdefault(v.data_ptr(), k)
            if name == k:
                out[k] = v
            keys[name] = keys.get(name, 0) + 1
        return out, keys

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = model.state_dict()
        avg, n_keys = self._unique_state(self.module)
        if self.steps == 0:
            for k, v in avg.items():
                v.copy_(src[k])
        else:
            m = self.momentum_at(self.steps)
            # avg + m * (src - avg) = (1 - m) * avg + m * src; n of those in a row leave (1 - m)^n of avg.
            # One call per distinct weight (1 for nearly all tensors, 1 - (1 - m)^3 for the shared head convs).
            groups: dict[float, list[str]] = {}
            for k, v in avg.items():
                if v.dtype.is_floating_point:
                    groups.setdefault(m if n_keys[k] == 1 else 1.0 - (1.0 - m) ** n_keys[k], []).append(k)
            for weight, ks in groups.items():
                torch._foreach_lerp_([avg[k] for k in ks], [src[k].to(avg[k].dtype) for k in ks], weight)
        self.steps += 1

    def state_dict(self) -> dict:
        """mmengine's layout: `module.<key>` for every weight, plus `steps`."""
        out = {f"module.{k}": v for k, v in self.module.state_dict().items()}
        out["steps"] = torch.tensor(self.steps, dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.module.load_state_dict({k[len("module."):]: v for k, v in state.items() if k.startswith("module.")})

"""ExpMomentumEMA: the averaged weights that get evaluated and saved.

momentum(step) = (1 - m) * exp(-(1 + step) / gamma) + m, so the average follows the model closely early on
(momentum near 1) and settles to m = 0.0002 later. Buffers (BN running statistics) are averaged too
(`update_buffers=True` in the official config); integer buffers are copied.
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
    def _unique_state(module: nn.Module) -> dict[str, torch.Tensor]:
        # The head's shared convs appear under several keys; update each tensor once per step.
        seen, out = set(), {}
        for k, v in module.state_dict(keep_vars=False).items():
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                out[k] = v
        return out

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        src = model.state_dict()
        avg = self._unique_state(self.module)
        if self.steps == 0:
            for k, v in avg.items():
                v.copy_(src[k])
        else:
            m = self.momentum_at(self.steps)
            floats = [k for k, v in avg.items() if v.dtype.is_floating_point]
            # avg + m * (src - avg) = (1 - m) * avg + m * src, over all tensors in one call.
            torch._foreach_lerp_([avg[k] for k in floats], [src[k].to(avg[k].dtype) for k in floats], m)
            for k, v in avg.items():
                if not v.dtype.is_floating_point:
                    v.copy_(src[k])
        self.steps += 1

    def state_dict(self) -> dict:
        """mmengine's layout: `module.<key>` for every weight, plus `steps`."""
        out = {f"module.{k}": v for k, v in self.module.state_dict().items()}
        out["steps"] = torch.tensor(self.steps, dtype=torch.int64)
        return out

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.module.load_state_dict({k[len("module."):]: v for k, v in state.items() if k.startswith("module.")})

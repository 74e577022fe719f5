"""Deterministic, non-trivial weights for parity checks and tests.

numpy's legacy `RandomState` gives the same numbers on every platform and version, so a checkpoint
can be rebuilt bit-for-bit from its seed instead of being stored (a tiny checkpoint is 20 MB).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def fill_deterministic(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every float parameter and BN buffer with seeded values of a realistic scale.

    BatchNorm statistics are made non-trivial on purpose: identity BN (mean 0, var 1) would hide an
    eps or momentum mistake and a wrong BN fold.
    """
    rng = np.random.RandomState(seed)
    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        shape = tuple(t.shape)
        if name.endswith("running_var"):
            v = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("running_mean") or name.endswith("bn.bias"):
            v = rng.uniform(-0.2, 0.2, shape)
        elif name.endswith("bn.weight"):
            v = rng.uniform(0.5, 1.5, shape)
        elif name.endswith(".bias"):
            v = rng.uniform(-0.1, 0.1, shape)
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            v = rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape)
        t.copy_(torch.from_numpy(v.astype(np.float32)))
    return model


PRIOR_PROB = 0.01  # the official classification-bias init, bias_init_with_prob(0.01)


@torch.no_grad()
def fill_trainable(model: nn.Module, seed: int = 0) -> nn.Module:
    """`fill_deterministic`, then the classification biases at the official prior-probability init, so that a
    training run starts where a real one does (scores near 0.01, not 0.5 everywhere)."""
    fill_deterministic(model, seed)
    for conv in model.bbox_head.rtm_cls:
        conv.bias.fill_(-float(np.log((1 - PRIOR_PROB) / PRIOR_PROB)))
    return model

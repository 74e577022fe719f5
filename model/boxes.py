"""Pure box geometry: grid priors and distance -> box decoding (IoUs for training live in model.losses).

Boxes are (x1, y1, x2, y2) in pixels everywhere.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def grid_priors(feat_sizes: Sequence[tuple[int, int]], strides: Sequence[int],
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(sum H*W, 4) priors (x, y, stride, stride), levels concatenated, row-major within a level.

    Like MMDetection's `MlvlPointGenerator(offset=0)`: (x, y) is the cell's top-left corner.
    """
    out = []
    for (h, w), s in zip(feat_sizes, strides):
        ys = torch.arange(h, device=device, dtype=dtype) * s
        xs = torch.arange(w, device=device, dtype=dtype) * s
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        st = torch.full_like(xx, float(s))
        out.append(torch.stack((xx, yy, st, st), dim=-1).reshape(-1, 4))
    return torch.cat(out, dim=0)


def distance2bbox(points: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """(..., 2+) points and (..., 4) ltrb distances -> (..., 4) boxes, unclamped."""
    x, y = points[..., 0], points[..., 1]
    return torch.stack((x - distance[..., 0], y - distance[..., 1],
                        x + distance[..., 2], y + distance[..., 3]), dim=-1)

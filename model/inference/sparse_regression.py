"""Box regression only where a box can come out: the head's box branch run at the candidate points alone.

Which points become candidates depends on the class scores only (score above the threshold, the best `nms_pre`
per level, `model.inference.postprocess`); the box branch's output at every other point is thrown away. So the
network is split in two: the runner computes the backbone, the neck and the class branch densely, and returns
the neck's feature map of each level instead of the box maps (`ClassesFirst`); post-processing then asks
`PointRegressor` for the distances at its candidates. The answer is the same function: the box branch is two
3x3 convolutions and a 1x1 (RTMDet's SepBN head), so a point's distances depend on the 5x5 neighbourhood of its
feature map alone, which is gathered and pushed through the same (BatchNorm-folded) weights as matrix products.

What it saves: the box branch's two 96->96 3x3 convolutions per level (RTMDet-tiny) are about a sixth of the
forward's multiply-adds (1.39 of ~8 GMAC at 640). A point needs the first convolution at its 3x3 neighbourhood;
neighbouring points share those (an object's candidates come in clusters), so each is computed once. Where the
point path would cost more than the dense branch (`DENSE_ABOVE`: scattered points, a busy level) the level runs
the dense branch instead: evaluation thresholds (score 0.001) make almost every point a candidate and get the
dense path, never a slower one.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# A level runs the dense box branch when the point path would compute more rows of its two 9C x C products (the
# first convolution's points plus the points themselves) than this share of the level's positions (the dense
# branch computes two rows per position). Measured (a `/tmp` script: 1x1, 3x3 and 6x6 clusters of points, 1 to 256
# an image, RTMDet-tiny's stride-8 level at 320, batch 8, 2 threads, the 2-core Zen 4 EPYC, 2026-12-06): a row of
# the point path took 2.4-3x the time of a dense row (gathers; MKL's GEMM against oneDNN's convolution), so it
# broke even at ~0.75 of the positions; 0.6 leaves a margin.
DENSE_ABOVE = 0.6

# (level, image index (N,), flat prior index (N,)) -> (N, 4) ltrb distances in input pixels.
DistancesAt = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


class ClassesFirst(nn.Module):
    """The network with the box branch left out: (class logits per level, neck features per level).

    Wraps an RTMDet (its head a `RTMDetSepBNHead`); any runner that runs a network returning two lists per level
    (eager, inductor, the ONNX runtimes through one export) runs this one unchanged."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        net = self.network
        feats = list(net.neck(net.backbone(x)))
        return [net.bbox_head.class_logits(level, f) for level, f in enumerate(feats)], feats


def _as_matrix(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A k x k convolution's weight as a (k*k*Cin, Cout) matrix in (ky, kx, cin) row order, and its bias."""
    w = conv.weight.detach()
    bias = conv.bias.detach() if conv.bias is not None else w.new_zeros(w.shape[0])
    return w.permute(2, 3, 1, 0).reshape(-1, w.shape[0]).contiguous(), bias.clone()


class PointRegressor:
    """A fused (BatchNorm-folded) RTMDetSepBNHead's box branch, evaluated at chosen points of a level.

    `distances(level, feature, image, prior)` -> (N, 4) ltrb distances in input pixels, exactly what the dense
    head gives at those points (the same weights; float rounding of a different summation order aside), for
    `feature` the level's neck output (B, C, H, W) and `prior` the flat index y * W + x."""

    def __init__(self, head: nn.Module, dense_above: float = DENSE_ABOVE) -> None:
        convs = head.reg_convs
        if len(convs[0]) != 2 or any(m.conv.kernel_size != (3, 3) for level in convs for m in level):
            raise ValueError("the point regressor needs two 3x3 convolutions per level (RTMDet's SepBN head)")
        if any(not isinstance(m.bn, nn.Identity) for level in convs for m in level):
            raise ValueError("fold the BatchNorms first (model.nn.rtmdet.fused_for_inference)")
        self.head = head  # for the dense path
        self.dense_above = dense_above
        self.strides = tuple(head.strides)
        self.exp_on_reg = bool(head.exp_on_reg)
        self.levels = []
        for level in range(len(self.strides)):
            first, second = (_as_matrix(m.conv) for m in convs[level])
            out_w = head.rtm_reg[level].weight.detach()
            last = (out_w.reshape(out_w.shape[0], -1).t().contiguous(), head.rtm_reg[level].bias.detach().clone())
            self.levels.append((first, second, last))

    def distances(self, level: int, feature: torch.Tensor, image: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        if image.numel() == 0:
            return feature.new_zeros((0, 4), dtype=torch.float32)
        b, _, h, w = feature.shape
        key = image * (h * w) + prior
        points, back = torch.unique(key, return_inverse=True)  # one computation per point, whatever its classes
        image, prior = points // (h * w), points % (h * w)
        y, x = prior // w, prior % w
        mids, where = self._first_conv_points(image, y, x, h, w)
        if mids.numel() + points.numel() > self.dense_above * b * h * w:
            dense = self.dense(level, feature)
            return dense.permute(0, 2, 3, 1).reshape(b * h * w, 4)[key]
        return self._at_points(level, feature, mids, where)[back]

    def dense(self, level: int, feature: torch.Tensor) -> torch.Tensor:
        """The whole level's (B, 4, H, W) distances, as the head computes them."""
        return self.head.box_distances(level, feature).float()

    @staticmethod
    def _first_conv_points(image: torch.Tensor, y: torch.Tensor, x: torch.Tensor, h: int, w: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first convolution's outputs the points need: each point's 3x3 neighbourhood, shared between
        neighbouring points (an object's candidates come in clusters), so each is computed once. Keys index a
        grid with a border of one, where the second convolution's padding lies; `where` (N * 9) says which key
        each point's neighbour is, in (dy, dx) order."""
        span = torch.arange(3, device=y.device)
        ny = (y[:, None] + span)[:, :, None].expand(-1, 3, 3)
        nx = (x[:, None] + span)[:, None, :].expand(-1, 3, 3)
        keys = (image[:, None, None] * (h + 2) + ny) * (w + 2) + nx
        return torch.unique(keys.reshape(-1), return_inverse=True)

    def _at_points(self, level: int, feature: torch.Tensor, mids: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        (w1, b1), (w2, b2), (w3, b3) = self.levels[level]
        _, c, h, w = feature.shape
        span = torch.arange(3, device=feature.device)
        m_img, rest = mids // ((h + 2) * (w + 2)), mids % ((h + 2) * (w + 2))
        my, mx = rest // (w + 2), rest % (w + 2)  # border-grid coordinates: the map's point is (my - 1, mx - 1)
        # Each one's 3x3 input window on the map: rows my - 2 .. my, zero outside the map (the first convolution's
        # padding). Clamped gathers and a mask: no padded copy of the map.
        rows, cols = my[:, None] - 2 + span, mx[:, None] - 2 + span  # (M, 3) each
        valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        nhwc = feature.permute(0, 2, 3, 1)
        window = nhwc[m_img[:, None, None], rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]
        window = (window.float() * valid[..., None])
        mid = F.silu(torch.addmm(b1, window.reshape(-1, 9 * c), w1))
        # Outside the map the second convolution sees its zero padding, not the first convolution's value there.
        inside = (my >= 1) & (my <= h) & (mx >= 1) & (mx <= w)
        mid = mid * inside[:, None]
        top = F.silu(torch.addmm(b2, mid[where].reshape(-1, 9 * w1.shape[1]), w2))
        reg = torch.addmm(b3, top, w3)
        return (reg.exp() if self.exp_on_reg else reg) * self.strides[level]


def dense_distances(bbox_preds: Sequence[torch.Tensor]) -> DistancesAt:
    """`distances_at` of dense head maps: indexing."""

    def distances_at(level: int, image: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        reg = bbox_preds[level]
        return reg.float().permute(0, 2, 3, 1).reshape(reg.shape[0], -1, 4)[image, prior]

    return distances_at


def sparse_distances(regressor: PointRegressor, features: Sequence[torch.Tensor]) -> DistancesAt:
    """`distances_at` of a `ClassesFirst` network's features: the box branch at the asked points only."""

    def distances_at(level: int, image: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        return regressor.distances(level, features[level], image, prior)

    return distances_at

"""Sparse box regression (model.inference.sparse_regression): the box branch at chosen points equals the dense
head there, and a Detector with it gives the dense Detector's detections, whatever the runner."""
import math

import cv2
import numpy as np
import pytest
import torch

from model import Detector, TestConfig, build_rtmdet
from model.inference.detections import DetectParams
from model.inference.runner import HeadOutputs, SparseHeadOutputs
from model.inference.sparse_regression import ClassesFirst, PointRegressor
from model.nn.rtmdet import fused_for_inference
from model.testing import fill_deterministic

SHIPPED = "weights/rtmdet_tiny_shapes.pth"


def fused(size: str) -> torch.nn.Module:
    return fused_for_inference(fill_deterministic(build_rtmdet(size, num_classes=3), 0)).to(
        memory_format=torch.channels_last)


def both_ways(size: str, batch: int, side: int):
    """The fused network, its dense box maps and its `ClassesFirst` features on one random batch."""
    net = fused(size)
    x = torch.randn(batch, 3, side, side).to(memory_format=torch.channels_last)
    _, reg = net(x)
    _, feats = ClassesFirst(net)(x)
    return net, reg, feats


def dense_at(reg: torch.Tensor, image: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    return reg.permute(0, 2, 3, 1).reshape(reg.shape[0], -1, 4)[image, prior]


@pytest.mark.parametrize("size", ["tiny", "m"])  # m: exp_on_reg (distances through exp)
@torch.inference_mode()
def test_points_equal_the_dense_head_at_every_border(size):
    net = fused(size)
    x = torch.randn(2, 3, 128, 96).to(memory_format=torch.channels_last)  # not square: rows and columns apart
    cls, reg = net(x)
    cls_first, feats = ClassesFirst(net)(x)
    points = PointRegressor(net.bbox_head, dense_above=math.inf)  # always the point path
    assert points.exp_on_reg == (size == "m")
    for level, feat in enumerate(feats):
        torch.testing.assert_close(cls_first[level], cls[level], rtol=0, atol=0)
        b, _, h, w = feat.shape
        # Every point of the map, in both images: corners and edges are where the paddings matter.
        image = torch.arange(b).repeat_interleave(h * w)
        prior = torch.arange(h * w).repeat(b)
        got = points.distances(level, feat, image, prior)
        want = dense_at(reg[level], image, prior)
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@torch.inference_mode()
def test_points_share_work_and_keep_the_asked_order():
    net, reg, feats = both_ways("tiny", 3, 160)
    points = PointRegressor(net.bbox_head, dense_above=math.inf)
    gen = torch.Generator().manual_seed(1)
    image = torch.randint(0, 3, (500,), generator=gen)
    prior = torch.randint(0, 20 * 20, (500,), generator=gen)  # repeats: a point asked for by several classes
    got = points.distances(0, feats[0], image, prior)
    want = dense_at(reg[0], image, prior)
    assert got.shape == (500, 4)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert points.distances(0, feats[0], image[:0], prior[:0]).shape == (0, 4)


@torch.inference_mode()
def test_many_points_take_the_dense_branch():
    net, reg, feats = both_ways("tiny", 1, 64)
    points = PointRegressor(net.bbox_head)  # default: DENSE_ABOVE
    calls = []
    dense = points.dense
    points.dense = lambda *a: calls.append(a[0]) or dense(*a)
    # The 8x8 stride-8 map. Two neighbours: 20 rows (18 first-convolution points + 2) against 0.6 x 64: at the points.
    # Forty points: the whole map. Six scattered points (no shared neighbours): 60 rows, more than the dense branch
    # would cost, though only a tenth of the positions.
    few, many, scattered = torch.tensor([0, 1]), torch.arange(40), torch.tensor([0, 3, 6, 24, 27, 30])
    for prior in (few, many, scattered):
        got = points.distances(0, feats[0], torch.zeros_like(prior), prior)
        assert (got - dense_at(reg[0], torch.zeros_like(prior), prior)).abs().max() <= 1e-5 * reg[0].abs().max()
    assert calls == [0, 0]


def test_the_regressor_wants_a_folded_head():
    with pytest.raises(ValueError, match="fold the BatchNorms"):
        PointRegressor(build_rtmdet("tiny", num_classes=3).bbox_head)


def shapes_images() -> list[np.ndarray]:
    from model.data.shapes import ShapesConfig, draw_shapes_on

    rng = np.random.default_rng(7)
    out = []
    for _ in range(3):
        img = np.full((300, 340, 3), 90, np.uint8)
        draw_shapes_on(img, rng, ShapesConfig())
        out.append(img)
    return out


def same_detections(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x.boxes) == len(y.boxes)
        np.testing.assert_array_equal(x.labels, y.labels)
        np.testing.assert_allclose(x.scores, y.scores, rtol=0, atol=1e-6)
        np.testing.assert_allclose(x.boxes, y.boxes, rtol=0, atol=1e-3)


# OpenVINO (18 s) in the full run only: the default run's 15-minute budget; ONNX Runtime runs the same exported
# network without its box branch there.
@pytest.mark.parametrize("mode", ["eager", "onnxruntime", pytest.param("openvino", marks=pytest.mark.slow)])
def test_detector_gives_the_dense_detections(mode):
    images = [cv2.imread("examples/shapes.jpg"), *shapes_images()]
    dense = Detector.from_checkpoint(SHIPPED, accelerate=mode)
    sparse = Detector.from_checkpoint(SHIPPED, accelerate=mode, sparse_regression=True)
    batch, infos = sparse.preprocess(images)
    assert isinstance(sparse.forward(batch), SparseHeadOutputs)
    assert isinstance(dense.forward(batch), HeadOutputs)
    want = dense(images)
    assert sum(len(d.boxes) for d in want) >= 12  # real detections, in every image
    assert all(len(d.boxes) for d in want)
    same_detections(sparse(images), want)
    # Each image's own threshold and classes, and the evaluation thresholds (every point a candidate: the
    # dense branch per level).
    params = [DetectParams(0.5, 100, None), DetectParams(0.3, 3, frozenset({1, 2})), DetectParams(0.05, 100, None),
              DetectParams(0.9, 100, None)]
    same_detections(sparse.postprocess(sparse.forward(batch), infos, params=params),
                    dense.postprocess(dense.forward(batch), infos, params=params))
    evaluation = TestConfig(input_size=sparse.input_size)
    same_detections(sparse(images, cfg=evaluation), dense(images, cfg=evaluation))


def test_off_by_default_in_the_library():
    model = fill_deterministic(build_rtmdet("tiny", num_classes=3), 0)
    runner = Detector(model, ["a", "b", "c"], device="cpu").runner
    assert runner.regressor is None and runner.engine_network is runner.network
    runner = Detector(model, ["a", "b", "c"], device="cpu", sparse_regression=True).runner
    assert isinstance(runner.regressor, PointRegressor) and isinstance(runner.engine_network, ClassesFirst)

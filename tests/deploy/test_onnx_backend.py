"""RTMDET_BACKEND=onnx: an `rtmdet export` file (heads or decoded) and an MMDeploy-style end-to-end file
(float NCHW input, dets/labels with NMS inside, fixed batch 1) give the PyTorch detector's detections,
in-process and through a real `rtmdet serve`."""
import httpx
import numpy as np
import pytest
import torch
from torch import nn
from torchvision.ops import batched_nms

from model import Detector, TestConfig
from model.boxes import distance2bbox, grid_priors
from model.export import export_onnx
from model.nn.rtmdet import fused_for_inference
from service.backends.onnx import OnnxRunner
from tests.service.svc_helpers import CLASS_NAMES, ServerProcess, jpeg

SIZE = 256


@pytest.fixture(scope="module")
def reference(net, photos):
    detector = Detector(net, CLASS_NAMES, device="cpu", test_cfg=TestConfig.serving(input_size=SIZE))
    dets = detector(photos)
    assert all(len(d) > 3 for d in dets)  # enough boxes for the comparison to mean something
    return dets


@pytest.fixture(scope="module")
def exported(net, tmp_path_factory):
    """One file per layout; onnxruntime-vs-PyTorch parity of the files themselves is tests/model/test_export.py's."""
    tmp = tmp_path_factory.mktemp("onnx")
    paths = {}
    for layout in ("heads", "decoded"):
        paths[layout] = tmp / f"{layout}.onnx"
        export_onnx(net, paths[layout], CLASS_NAMES, input_size=SIZE, layout=layout, dynamic_batch=True, check=False)
    return paths


def assert_same(got, want, box_atol=0.05):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.labels.tolist() == w.labels.tolist()
        assert g.class_names == w.class_names
        np.testing.assert_allclose(g.scores, w.scores, atol=1e-4)
        np.testing.assert_allclose(g.boxes, w.boxes, atol=box_atol)


@pytest.mark.parametrize("layout", ["heads", "decoded"])
def test_rtmdet_export_gives_the_pytorch_detections(exported, photos, reference, layout):
    runner = OnnxRunner(exported[layout])
    assert runner.layout == layout and list(runner.info.class_names) == CLASS_NAMES
    detector = Detector.from_runner(runner)  # serving thresholds at the file's input size
    assert_same(detector(photos), reference)
    info = detector.describe()
    assert info["backend"] == "onnx" and info["input_size"] == SIZE and info["size"] == "tiny"
    # The file takes only its square: the tight canvas is refused in one line, not a shape error per batch.
    assert runner.info.fixed_input_size
    with pytest.raises(ValueError, match="tight canvas needs a network that takes any height and width"):
        Detector.from_runner(runner, TestConfig.serving(input_size=SIZE, canvas="tight"))
    with pytest.raises(ValueError, match="tight canvas"):
        detector.cfg = detector.with_config(canvas="tight")


class MMDeployStyleEndToEnd(nn.Module):
    """What an MMDeploy end-to-end ONNX looks like from outside: normalised float (1,3,S,S) `input`,
    `dets` (1,K,5) and `labels` (1,K) after class-aware NMS, padded with zero rows to K."""

    def __init__(self, net, size: int, keep: int = 100, iou: float = 0.65) -> None:
        super().__init__()
        self.net, self.keep, self.iou = net, keep, iou
        sizes = [(size // s, size // s) for s in net.bbox_head.strides]
        self.register_buffer("priors", grid_priors(sizes, net.bbox_head.strides)[:, :2])

    def forward(self, x):
        cls, reg = self.net(x)
        c = cls[0].shape[1]
        scores = torch.cat([t.permute(0, 2, 3, 1).reshape(-1, c) for t in cls]).sigmoid()
        boxes = distance2bbox(self.priors, torch.cat([t.permute(0, 2, 3, 1).reshape(-1, 4) for t in reg]))
        flat = scores.reshape(-1)
        top, idx = flat.topk(1000)
        box, label = boxes[idx // c], idx % c
        kept = batched_nms(box, top, label, self.iou)
        dets = torch.cat([box[kept], top[kept, None]], 1)
        dets = torch.cat([dets, torch.zeros(self.keep, 5)])[: self.keep]
        labels = torch.cat([label[kept], torch.zeros(self.keep, dtype=torch.int64)])[: self.keep]
        return dets[None], labels[None]


def test_mmdeploy_end_to_end_file_gives_the_pytorch_detections(net, photos, reference, tmp_path):
    path = tmp_path / "end2end.onnx"
    e2e = MMDeployStyleEndToEnd(fused_for_inference(net), SIZE).eval()
    torch.onnx.export(e2e, (torch.zeros(1, 3, SIZE, SIZE),), str(path), input_names=["input"],
                      output_names=["dets", "labels"])
    runner = OnnxRunner(path, class_names=CLASS_NAMES)
    assert runner.layout == "mmdeploy" and runner.float_input and runner.fixed_batch == 1
    detector = Detector.from_runner(runner, TestConfig.serving(input_size=640))
    assert detector.input_size == SIZE  # taken from the file's fixed input shape
    # Three images through a batch-1 file: run in chunks, results in order.
    assert_same(detector(photos), reference, box_atol=0.1)


def test_unknown_outputs_are_refused(tmp_path):
    path = tmp_path / "other.onnx"
    torch.onnx.export(nn.Conv2d(3, 2, 1).eval(), (torch.zeros(1, 3, 8, 8),), str(path), input_names=["x"],
                      output_names=["y"])
    with pytest.raises(ValueError, match="unrecognised ONNX outputs"):
        OnnxRunner(path)


def test_rtmdet_backend_onnx_builds_an_onnx_runner_from_settings(exported, tmp_path):
    from service.backends import BackendUnavailable, create_runner
    from service.settings import ServiceSettings

    runner = create_runner(ServiceSettings(backend="onnx", weights=exported["heads"], input_size=SIZE).default_spec())
    assert isinstance(runner, OnnxRunner) and list(runner.info.class_names) == CLASS_NAMES
    runner.close()
    with pytest.raises(BackendUnavailable, match="cannot serve with ONNX Runtime"):
        create_runner(ServiceSettings(backend="onnx", weights=tmp_path / "missing.onnx").default_spec())


@pytest.mark.slow
def test_service_serves_an_onnx_file(net, exported, photos, tmp_path):
    srv = ServerProcess(exported["heads"], tmp_path / "server.log", RTMDET_BACKEND="onnx", RTMDET_INPUT_SIZE=str(SIZE),
                        RTMDET_MAX_BATCH_SIZE="4")
    try:
        srv.wait_ready(timeout=120)
        model_info = httpx.get(f"{srv.http}/v1/model", timeout=10).json()
        assert model_info["backend"] == "onnx" and model_info["classes"] == CLASS_NAMES
        image = photos[2]
        body = httpx.post(f"{srv.http}/detect", content=jpeg(image, 100), headers={"content-type": "image/jpeg"},
                          timeout=30).json()
        import cv2

        decoded = cv2.imdecode(np.frombuffer(jpeg(image, 100), np.uint8), cv2.IMREAD_COLOR)
        (want,) = Detector(net, CLASS_NAMES, device="cpu", test_cfg=TestConfig.serving(input_size=SIZE))([decoded])
        got = body["detections"]
        assert [d["class_name"] for d in got] == want.class_names[: len(got)] and len(got) > 3
        np.testing.assert_allclose([d["box"] for d in got], want.boxes[: len(got)], atol=0.05)
    finally:
        srv.stop()

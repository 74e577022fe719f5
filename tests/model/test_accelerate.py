"""The fast inference paths give the eager network's results: the (opt-in) oneDNN TorchScript runner, batch
buckets (the CUDA-graph padding, checked with the eager network), and JPEG decode + letterbox on the device.
The other CPU runners and `auto`: tests/model/test_runners.py."""
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from model import Detector, TestConfig, build_rtmdet
from model.inference.accelerate import (
    EagerRunner,
    TorchScriptRunner,
    bucket_for,
    pad_batch,
    resolve_mode,
    trim_outputs,
)
from model.inference.device_preprocess import letterbox_rgb_chw, preprocess_jpegs
from model.inference.preprocess import Normalizer, letterbox
from model.nn.rtmdet import fused_for_inference
from model.testing import fill_deterministic

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = [ROOT / "examples" / "astronaut.jpg", ROOT / "examples" / "coffee.jpg"]


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a[0] + a[1], b[0] + b[1], strict=True))


@pytest.fixture(scope="module")
def net():
    return fused_for_inference(fill_deterministic(build_rtmdet("tiny"), 3)).to(memory_format=torch.channels_last)


def test_torchscript_runner_equals_eager_across_batch_and_input_sizes(net):
    g = torch.Generator().manual_seed(0)
    normalize = Normalizer(torch.device("cpu"), channels_last=True)
    runner = TorchScriptRunner(net, normalize, torch.randint(0, 256, (1, 128, 128, 3), dtype=torch.uint8, generator=g))
    eager = EagerRunner(net, normalize)
    for shape in [(1, 128, 128, 3), (2, 128, 128, 3), (1, 96, 160, 3)]:  # shapes other than the traced one too
        x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)
        ref = eager(x)
        for _ in range(3):  # the profiling executor changes the graph after the first calls: check each
            out = runner(x)
            assert [o.shape for o in out[0]] == [r.shape for r in ref[0]]
            assert max_diff(out, ref) < 1e-4


def test_padded_bucket_outputs_equal_the_unpadded_ones(net):
    assert [bucket_for(b, [1, 2, 4, 8]) for b in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 9]
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    padded = pad_batch(x, 4)
    assert padded.shape[0] == 4 and torch.equal(padded[:3], x) and torch.equal(padded[3], x[2])
    with torch.inference_mode():
        ref = net(x)
        out = trim_outputs(net(padded), 3)
    assert [o.shape[0] for o in out[0] + out[1]] == [3] * 6
    assert max_diff(out, ref) < 1e-4


def test_modes_are_checked_against_the_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_mode(None, cpu) == "eager"  # no deprecated path by default
    assert resolve_mode(None, cuda) == resolve_mode("auto", cuda) == "cudagraph"
    assert resolve_mode("auto", cpu) == "auto"  # measured when the first batch comes
    assert resolve_mode("onednn", cpu) == "torchscript"  # the old name still works
    for mode in ("inductor", "onnxruntime", "openvino", "torchscript"):
        assert resolve_mode(mode, cpu) == mode
        with pytest.raises(ValueError, match="for the CPU"):
            resolve_mode(mode, cuda)
    with pytest.raises(ValueError, match="CUDA graphs"):
        resolve_mode("cudagraph", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown"):
        resolve_mode("tensorrt", torch.device("cpu"))


def confident_model():
    """Seeded weights that still fire on real photos (as in test_detector.py)."""
    model = fill_deterministic(build_rtmdet("tiny", num_classes=3), 5)
    with torch.no_grad():
        for conv in model.bbox_head.rtm_cls:
            conv.bias.fill_(0.0)
            conv.weight.mul_(30.0)  # spread scores so NMS order is not a coin toss
        for conv in model.bbox_head.rtm_reg:
            conv.bias.fill_(3.0)  # boxes about 3 strides from the prior on each side
    return model.eval()


def test_detector_torchscript_path_gives_the_eager_detections():
    model = confident_model()
    imgs = [cv2.imread(str(p)) for p in PHOTOS]
    cfg = TestConfig(input_size=160, score_thr=0.3)
    eager = Detector(model, ["a", "b", "c"], device="cpu", test_cfg=cfg)
    assert eager.describe()["accelerate"] == "eager"
    fast = Detector(model, ["a", "b", "c"], device="cpu", accelerate="onednn", test_cfg=cfg)
    assert fast.describe()["accelerate"] == "torchscript"
    fast.warmup([2])
    for e, f in zip(eager(imgs), fast(imgs), strict=True):
        assert len(e) > 0 and len(e) == len(f)
        assert_same_detections_any_order(e, f, atol_score=1e-5, atol_box=1e-2)


def assert_same_detections_any_order(a, b, atol_score: float, atol_box: float) -> None:
    """Every detection of `a` has its own twin in `b` (same label, score and box within tolerance). Order is not
    compared: two detections whose scores agree to 1e-6 swap places when the fused kernels round differently
    (seen on an AMD EPYC host, not on the Intel ones), and that is the same answer."""
    free = list(range(len(b)))
    for i in range(len(a)):
        twin = next((j for j in free if b.labels[j] == a.labels[i] and abs(b.scores[j] - a.scores[i]) <= atol_score
                     and np.abs(b.boxes[j] - a.boxes[i]).max() <= atol_box), None)
        assert twin is not None, f"no twin for detection {i}: {a.labels[i]} {a.scores[i]} {a.boxes[i]}"
        free.remove(twin)


def test_device_letterbox_matches_the_cv2_letterbox():
    for path in PHOTOS:
        img = cv2.imread(str(path))
        for size in (320, 640, 900):  # down, near and up
            ref, ref_info = letterbox(img, size)
            rgb = torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1])).permute(2, 0, 1)
            out, (info,) = letterbox_rgb_chw([rgb], size)
            assert info == ref_info
            diff = np.abs(out[0].numpy().astype(int) - ref.astype(int))
            assert diff.max() <= 1 and diff.mean() < 0.2  # float vs cv2's fixed-point weights: a level at most
            nh, nw = round(info.scale_h * info.orig_h), round(info.scale_w * info.orig_w)
            assert (out[0, nh:] == 114).all() and (out[0, :, nw:] == 114).all()


def test_jpeg_bytes_to_device_batch_then_detections(tmp_path):
    data = [p.read_bytes() for p in PHOTOS]
    batch, infos = preprocess_jpegs(data, 320, "cpu")
    assert batch.shape == (2, 320, 320, 3) and batch.dtype == torch.uint8
    for b, info, p in zip(batch, infos, PHOTOS, strict=True):
        ref, ref_info = letterbox(cv2.imread(str(p)), 320)
        assert info == ref_info
        assert np.abs(b.numpy().astype(int) - ref.astype(int)).max() <= 2
    det = Detector(confident_model(), ["a", "b", "c"], device="cpu",
                   accelerate="eager", test_cfg=TestConfig(input_size=320, score_thr=0.0, max_per_img=5))
    batch2, infos2 = det.preprocess_jpegs(data)
    assert torch.equal(batch2, batch) and infos2 == infos
    dets = det.postprocess(det.forward(batch2), infos2)
    assert [len(d) for d in dets] == [5, 5]

"""The fast inference paths give the eager network's results: oneDNN TorchScript runner, batch buckets
(the CUDA-graph padding, checked with the eager network), and JPEG decode + letterbox on the device."""
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from model import Detector, TestConfig, build_rtmdet
from model.inference.accelerate import OneDNNRunner, bucket_for, pad_batch, resolve_mode, trim_outputs
from model.inference.device_preprocess import letterbox_rgb_chw, preprocess_jpegs
from model.inference.preprocess import letterbox
from model.nn.rtmdet import fused_for_inference
from model.testing import fill_deterministic

ROOT = Path(__file__).resolve().parents[2]
PHOTOS = [ROOT / "examples" / "astronaut.jpg", ROOT / "examples" / "coffee.jpg"]


def max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a[0] + a[1], b[0] + b[1], strict=True))


@pytest.fixture(scope="module")
def net():
    return fused_for_inference(fill_deterministic(build_rtmdet("tiny"), 3)).to(memory_format=torch.channels_last)


def test_onednn_runner_equals_eager_across_batch_and_input_sizes(net):
    g = torch.Generator().manual_seed(0)
    example = torch.randn(1, 3, 128, 128, generator=g)
    runner = OneDNNRunner(net, example)
    for shape in [(1, 3, 128, 128), (2, 3, 128, 128), (1, 3, 96, 160)]:  # shapes other than the traced one too
        x = torch.randn(*shape, generator=g).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            ref = net(x)
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
    assert resolve_mode("auto", torch.device("cpu")) == "onednn"
    assert resolve_mode("auto", torch.device("cuda")) == "cudagraph"
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


def test_detector_default_path_gives_the_eager_detections():
    model = confident_model()
    imgs = [cv2.imread(str(p)) for p in PHOTOS]
    cfg = TestConfig(input_size=160, score_thr=0.3)
    eager = Detector(model, ["a", "b", "c"], device="cpu", accelerate="eager", test_cfg=cfg)
    fast = Detector(model, ["a", "b", "c"], device="cpu", test_cfg=cfg)
    assert fast.describe()["accelerate"] == "onednn"
    fast.warmup([2])
    for e, f in zip(eager(imgs), fast(imgs), strict=True):
        assert len(e) > 0 and len(e) == len(f)
        np.testing.assert_array_equal(e.labels, f.labels)
        np.testing.assert_allclose(e.scores, f.scores, atol=1e-5)
        np.testing.assert_allclose(e.boxes, f.boxes, atol=1e-2)


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

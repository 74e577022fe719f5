"""Detector end to end on real photos: batching, device path, class names, CLI."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from skimage import data
from torchvision.ops import box_iou

from model import Detector, TestConfig, build_rtmdet, save_checkpoint
from model.checkpoint import make_meta
from model.testing import fill_deterministic

ROOT = Path(__file__).resolve().parents[2]


def confident_model(num_classes=3):
    """Seeded weights with the class prior removed, so a random net still fires on real images."""
    m = fill_deterministic(build_rtmdet("tiny", num_classes=num_classes), 5)
    with torch.no_grad():
        for conv in m.bbox_head.rtm_cls:
            conv.bias.fill_(0.0)
            conv.weight.mul_(30.0)  # spread the logits: near-equal scores would make NMS order a coin toss
        for conv in m.bbox_head.rtm_reg:
            conv.bias.fill_(3.0)  # boxes about 3 strides from the prior on each side
    return m.eval()


@pytest.fixture(scope="module")
def photos():
    return [np.ascontiguousarray(im[:, :, ::-1]) for im in (data.astronaut(), data.coffee(), data.chelsea())]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "tiny3.pth"
    save_checkpoint(path, confident_model().state_dict(), make_meta(["circle", "square", "triangle"]))
    return path


def test_from_checkpoint_takes_class_names_from_meta(ckpt):
    det = Detector.from_checkpoint(ckpt, size="tiny", device="cpu", test_cfg=TestConfig.serving(input_size=320))
    assert det.class_names == ["circle", "square", "triangle"]
    info = det.describe()
    assert info["size"] == "tiny" and info["input_size"] == 320 and len(info["weights_sha256"]) == 64


def matched_fraction(a, b, iou=0.99):
    """Share of a's detections that b also has (same label, near-identical box)."""
    if len(a) == 0:
        return 1.0
    ious = box_iou(torch.from_numpy(a.boxes), torch.from_numpy(b.boxes)).numpy()
    same = (a.labels[:, None] == b.labels[None, :]) & (ious > iou)
    return float(same.any(1).mean())


def test_batch_results_equal_one_by_one_results(ckpt, photos):
    det = Detector.from_checkpoint(ckpt, size="tiny", device="cpu", test_cfg=TestConfig.serving(input_size=320))
    batch = det(photos)
    assert sum(len(d) for d in batch) > 0
    for img, together in zip(photos, batch):
        (alone,) = det([img])
        # Batched convolutions round differently in the last bit; with this random net's near-equal
        # scores a box on the NMS borderline may flip, so allow one in fifty.
        assert matched_fraction(alone, together) >= 0.98
        assert matched_fraction(together, alone) >= 0.98


def test_boxes_lie_inside_the_original_image(ckpt, photos):
    det = Detector.from_checkpoint(ckpt, size="tiny", device="cpu", test_cfg=TestConfig.serving(input_size=320))
    for img, d in zip(photos, det(photos)):
        h, w = img.shape[:2]
        assert (d.boxes[:, [0, 2]] >= 0).all() and (d.boxes[:, [0, 2]] <= w).all()
        assert (d.boxes[:, [1, 3]] >= 0).all() and (d.boxes[:, [1, 3]] <= h).all()
        assert (d.scores >= 0.3).all()
        assert [det.class_names[i] for i in d.labels] == d.class_names


def test_fused_and_channels_last_paths_give_the_unfused_results(photos):
    model = confident_model()
    cfg = TestConfig.serving(input_size=256)
    ref = Detector(model, ["a", "b", "c"], device="cpu", fuse=False, channels_last=False, test_cfg=cfg)(photos)
    fast = Detector(model, ["a", "b", "c"], device="cpu", fuse=True, channels_last=True, test_cfg=cfg)(photos)
    for r, f in zip(ref, fast):
        assert len(r) > 0
        assert matched_fraction(r, f) >= 0.98 and matched_fraction(f, r) >= 0.98


def test_detections_follow_the_object_when_the_image_is_flipped(ckpt, photos):
    det = Detector.from_checkpoint(ckpt, size="tiny", device="cpu", test_cfg=TestConfig.serving(input_size=320))
    img = cv2.resize(photos[0], (320, 320))
    (a,) = det([img])
    (b,) = det([np.ascontiguousarray(img[:, ::-1])])
    # the network is not flip-equivariant, but the biggest detection must move to the mirrored place
    assert len(a) and len(b)
    mirrored = np.stack([320 - b.boxes[:, 2], b.boxes[:, 1], 320 - b.boxes[:, 0], b.boxes[:, 3]], 1)
    assert mirrored.min() >= 0


def test_rejects_images_that_are_not_bgr_uint8(ckpt):
    det = Detector.from_checkpoint(ckpt, size="tiny", device="cpu")
    with pytest.raises(ValueError, match="uint8 BGR"):
        det([np.zeros((10, 10), np.uint8)])
    with pytest.raises(ValueError, match="zero width or height"):
        det([np.zeros((0, 10, 3), np.uint8)])


def test_cli_detect_prints_json_and_draws(ckpt, tmp_path):
    out = subprocess.run([sys.executable, "-m", "service.cli", "detect", str(ROOT / "examples" / "astronaut.jpg"),
                          "--weights", str(ckpt), "--img-size", "320", "--device", "cpu", "--out", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert (result["width"], result["height"]) == (512, 512)
    assert result["detections"] and {d["class_name"] for d in result["detections"]} <= {"circle", "square", "triangle"}
    drawn = cv2.imread(str(tmp_path / "astronaut_det.jpg"))
    assert drawn.shape == (512, 512, 3)


def test_cli_detect_reports_a_bad_checkpoint_in_one_line(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    out = subprocess.run([sys.executable, "-m", "service.cli", "detect", str(ROOT / "examples" / "astronaut.jpg"),
                          "--weights", str(bad)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "bad.pth: not a readable checkpoint" in out.stderr

"""The tight canvas: the letterbox padded only to a multiple of the largest stride, and what runs on it."""
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from model.config import PAD_VALUE, TestConfig
from model.data.shapes import ShapesConfig, _load_photos, draw_shapes_image
from model.inference.detector import Detector
from model.inference.preprocess import join_batches, letterbox, orientation_groups, stack_letterboxed

WEIGHTS = Path(__file__).resolve().parents[2] / "weights" / "rtmdet_tiny_shapes.pth"


def gradient(h, w):
    """A BGR image whose every pixel differs from its neighbours, so a misplaced copy cannot pass."""
    y, x = np.mgrid[:h, :w]
    return np.stack([x % 256, y % 256, (x + 3 * y) % 256], -1).astype(np.uint8)


@pytest.mark.parametrize("hw, size, canvas", [
    ((960, 1280), 640, (480, 640)),  # 4:3: exactly 480, nothing to pad
    ((1080, 1920), 640, (384, 640)),  # 16:9: 360 rounded up to 384
    ((1280, 720), 320, (320, 192)),  # portrait 9:16 at 320: 180 -> 192
    ((500, 500), 640, (640, 640)),  # square: the square canvas
    ((3, 1000), 640, (32, 640)),  # a sliver: at least one stride
])
def test_the_tight_canvas_is_the_resized_image_rounded_up_to_the_stride(hw, size, canvas):
    image = gradient(*hw)
    square, square_info = letterbox(image, size)
    tight, tight_info = letterbox(image, size, multiple=32)
    assert tight.shape == (*canvas, 3) and square.shape == (size, size, 3)
    assert tight_info == square_info  # boxes map back the same way
    nh, nw = round(hw[0] * square_info.scale_h), round(hw[1] * square_info.scale_w)
    # The same resized pixels in the corner, the same grey after them: the square canvas cut down.
    assert np.array_equal(tight, square[:canvas[0], :canvas[1]])
    assert (tight[nh:] == PAD_VALUE).all() and (tight[:, nw:] == PAD_VALUE).all()


def test_canvases_of_different_shapes_stack_on_the_largest_with_grey():
    a, b = gradient(64, 96), gradient(96, 32)
    batch = stack_letterboxed([a, b])
    assert batch.shape == (2, 96, 96, 3) and batch.dtype == torch.uint8
    assert np.array_equal(batch[0, :64, :96].numpy(), a) and (batch[0, 64:] == PAD_VALUE).all()
    assert np.array_equal(batch[1, :96, :32].numpy(), b) and (batch[1, :, 32:] == PAD_VALUE).all()
    joined = join_batches([batch[:1, :64], batch[1:, :, :32], torch.from_numpy(gradient(32, 32))[None]])
    assert joined.shape == (3, 96, 96, 3)
    assert torch.equal(joined[:2], batch) and (joined[2, 32:] == PAD_VALUE).all()
    same = [torch.from_numpy(a)[None]] * 2
    assert torch.equal(join_batches(same), torch.cat(same))  # one shape: a plain concatenation


def test_orientation_groups_keep_order_and_put_squares_with_landscapes():
    assert orientation_groups([(480, 640), (640, 480), (640, 640), (360, 640), (641, 640)]) == [[0, 2, 3], [1, 4]]
    assert orientation_groups([(640, 480)]) == [[0]]
    assert orientation_groups([]) == []


@pytest.fixture(scope="module")
def shapes_images():
    """Shapes images the shipped model never saw (seed 4343), both orientations, 0.6-0.8 aspect, with boxes."""
    rng = np.random.default_rng(4343)
    cfg = ShapesConfig(img_size=320, min_aspect=0.6)
    photos = _load_photos()
    images = []
    while len(images) < 8:
        img, objects = draw_shapes_image(rng, cfg, photos)
        if min(img.shape[:2]) / max(img.shape[:2]) <= 0.8:
            images.append((img, objects))
    assert {img.shape[0] > img.shape[1] for img, _ in images} == {True, False}
    return images


class Recorded:
    """The detector's runner, recording the shape of every batch it runs."""

    def __init__(self, detector):
        self.shapes = []
        inner = detector.runner.forward
        detector.runner.forward = lambda batch: (self.shapes.append(tuple(batch.shape)), inner(batch))[1]


def test_the_shipped_model_on_tight_canvases_finds_what_it_finds_on_square_ones(shapes_images):
    images = [img for img, _ in shapes_images]
    square = Detector.from_checkpoint(WEIGHTS, device="cpu")
    tight = Detector.from_checkpoint(WEIGHTS, device="cpu", test_cfg=TestConfig.serving(input_size=320,
                                                                                          canvas="tight"))
    seen = Recorded(tight)
    found = total = 0
    for (img, objects) in shapes_images:
        a, b = square([img])[0], tight([img])[0]
        # It ran on the small canvas: the long side at 320, the short one at most 0.8 of it rounded up to 32.
        h, w = seen.shapes[-1][1:3]
        assert max(h, w) == 320 and min(h, w) <= 256 and (h > w) == (img.shape[0] > img.shape[1])
        # Every confident box of the square canvas is there on the tight one, same class, nearly the same place,
        # and the other way round (the padding the network sees differs, so the numbers do too, a little: scores
        # near the threshold come and go).
        strong_a, strong_b = a.scores >= 0.75, b.scores >= 0.75
        assert strong_a.sum() > 0
        iou = box_iou(torch.from_numpy(a.boxes[strong_a]), torch.from_numpy(b.boxes))
        same = torch.from_numpy(a.labels[strong_a])[:, None] == torch.from_numpy(b.labels)[None]
        assert ((iou >= 0.9) & same).any(1).all()
        iou = box_iou(torch.from_numpy(b.boxes[strong_b]), torch.from_numpy(a.boxes))
        same = torch.from_numpy(b.labels[strong_b])[:, None] == torch.from_numpy(a.labels)[None]
        assert ((iou >= 0.9) & same).any(1).all()
        # And what is drawn is found.
        gt = torch.tensor(np.array([o.box for o in objects]), dtype=torch.float32)
        hit = (box_iou(gt, torch.from_numpy(b.boxes)) >= 0.5) & \
            (torch.tensor([o.label for o in objects])[:, None] == torch.from_numpy(b.labels)[None])
        found, total = found + int(hit.any(1).sum()), total + len(objects)
    assert total >= 20 and found / total >= 0.95, (found, total)
    # A batch of both orientations: one forward per orientation, each image's detections in its place, equal to
    # running each orientation's images as a batch of their own.
    seen.shapes.clear()
    batch = tight(images)
    groups = orientation_groups([i.shape[:2] for i in images])
    assert sorted(s[0] for s in seen.shapes) == sorted(len(g) for g in groups) and len(groups) == 2
    for group in groups:
        alone = tight([images[i] for i in group])
        for i, dets in zip(group, alone, strict=True):
            np.testing.assert_array_equal(batch[i].boxes, dets.boxes)
            np.testing.assert_array_equal(batch[i].labels, dets.labels)


def test_a_runtime_runner_made_for_the_square_refuses_the_tight_canvas():
    """The runtimes' export takes any canvas only when the Detector is made for the tight one (it costs the export
    seconds); one made for the square says so in one line, before any export runs."""
    from tests.model.test_detector import confident_model

    for mode in ("onnxruntime", "openvino", "auto"):
        det = Detector(confident_model(), ["a", "b", "c"], device="cpu", accelerate=mode,
                       test_cfg=TestConfig(input_size=96))
        assert det.info.square_only
        with pytest.raises(ValueError, match=f"this {mode} runner was made for the square canvas"):
            det.cfg = det.with_config(canvas="tight")
        tight = Detector(confident_model(), ["a", "b", "c"], device="cpu", accelerate=mode,
                         test_cfg=TestConfig(input_size=96, canvas="tight"))
        assert not tight.info.square_only and tight.runner.any_canvas
    # `rtmdet detect --canvas tight`'s way: the checkpoint's serving config on the tight canvas, runner made for it.
    shipped = Detector.from_checkpoint(WEIGHTS, device="cpu", accelerate="onnxruntime", canvas="tight")
    assert (shipped.cfg.canvas, shipped.input_size, shipped.info.square_only) == ("tight", 320, False)
    eager = Detector(confident_model(), ["a", "b", "c"], device="cpu", test_cfg=TestConfig(input_size=96))
    assert not eager.info.square_only
    eager.cfg = eager.with_config(canvas="tight")  # eager takes any canvas


def test_a_canvas_that_is_neither_is_refused():
    with pytest.raises(ValueError, match="canvas must be one of square, tight"):
        TestConfig(canvas="round")


def test_the_device_letterbox_makes_the_same_tight_canvas_as_the_cv2_one():
    """The GPU path's letterbox (run here on the CPU): same tight canvas, same infos, pixels within a level."""
    from model.inference.device_preprocess import letterbox_rgb_chw

    images = [gradient(960, 1280), gradient(1280, 720), gradient(300, 400)]
    rgb = [torch.from_numpy(np.ascontiguousarray(i[:, :, ::-1])).permute(2, 0, 1) for i in images]
    out, infos = letterbox_rgb_chw(rgb, 320, multiple=32)
    want, want_infos = zip(*(letterbox(i, 320, multiple=32) for i in images))
    assert out.shape == (3, 320, 320, 3)  # the largest of 256 x 320, 320 x 192 and 256 x 320
    assert list(infos) == list(want_infos)
    for o, w in zip(out, want, strict=True):
        diff = np.abs(o[:w.shape[0], :w.shape[1]].numpy().astype(int) - w.astype(int))
        assert diff.max() <= 1
        assert (o[w.shape[0]:] == PAD_VALUE).all() and (o[:, w.shape[1]:] == PAD_VALUE).all()
    landscapes, _ = letterbox_rgb_chw([rgb[0], rgb[2]], 320, multiple=32)
    assert landscapes.shape == (2, 256, 320, 3)  # 240 rounded up to 32


def test_an_export_with_a_dynamic_canvas_serves_the_tight_canvas(tmp_path):
    """`rtmdet export --dynamic-canvas`: the ONNX backend takes tight canvases and gives the torch Detector's
    detections on them."""
    from model.export import export_onnx
    from service.backends.onnx import OnnxRunner
    from tests.model.test_detector import confident_model

    model = confident_model()
    path = tmp_path / "dynamic.onnx"
    report = export_onnx(model, path, ["a", "b", "c"], input_size=96, dynamic_batch=True, dynamic_canvas=True)
    assert report.passed and report.dynamic_canvas
    runner = OnnxRunner(path)
    assert not runner.info.fixed_input_size and runner.info.input_size == 96
    cfg = TestConfig(input_size=96, score_thr=0.3, canvas="tight")
    onnx = Detector.from_runner(runner, cfg)
    torch_det = Detector(model, ["a", "b", "c"], device="cpu", test_cfg=cfg)
    images = [gradient(60, 96), gradient(96, 40), gradient(30, 90)]
    seen = Recorded(onnx)
    got, want = onnx(images), torch_det(images)
    assert sorted(s[1:3] for s in seen.shapes) == [(64, 96), (96, 64)]
    for g, w in zip(got, want, strict=True):
        assert len(w.boxes) > 0
        np.testing.assert_array_equal(g.labels, w.labels)
        np.testing.assert_allclose(g.boxes, w.boxes, atol=1e-2)

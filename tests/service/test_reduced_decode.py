"""A large JPEG decoded at 1/2, 1/4 or 1/8 scale (`RTMDET_REDUCED_DECODE`): which images, what size, and that
the detections stay in the original's pixels, in-process and through the real server."""
from __future__ import annotations

import asyncio
import io

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image
from svc_helpers import INPUT_SIZE, jpeg, metric_samples, metric_value, png

from model import Detector, TestConfig
from service.imaging import CorruptImage, TooManyPixels, decode_image, decode_image_to_fit
from service.pipeline import DetectionService
from service.schemas import DetectQuery
from service.settings import ServiceSettings

MB = 1 << 20
REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


@pytest.fixture(scope="module")
def big(photos) -> np.ndarray:
    """A 1280 x 960 photo (BGR): four times a 320 input on the long side."""
    return cv2.resize(photos["chelsea"], (1280, 960), interpolation=cv2.INTER_CUBIC)


def opencv_reduced(data: bytes, factor: int) -> np.ndarray:
    """OpenCV's own scaled-IDCT decode: another libjpeg build to check ours against."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), REDUCED[factor])


@pytest.mark.parametrize(("fit", "factor"), [(320, 4), (160, 8), (600, 2), (40, 8)])
def test_a_large_jpeg_is_decoded_at_the_largest_scale_that_still_covers_the_input(big, fit, factor):
    data = jpeg(big, 92)
    out = decode_image_to_fit(data, 8 * MB, 4_000_000, fit)
    assert (out.height, out.width) == (960, 1280)  # the original's size, for the answer and the boxes
    assert out.image.shape == (960 // factor, 1280 // factor, 3)
    assert out.reduced and out.scale == f"1/{factor}"
    ref = opencv_reduced(data, factor).astype(int)
    assert np.abs(out.image.astype(int) - ref).mean() < 1.0  # the same scaled IDCT, up to a level here and there
    # Never smaller than the letterboxed size: the resize to the input only ever shrinks.
    assert max(out.image.shape[:2]) >= fit


@pytest.mark.parametrize("fit", [None, 641, 1280])
def test_a_jpeg_less_than_twice_the_input_is_decoded_whole(big, fit):
    data = jpeg(big, 92)
    out = decode_image_to_fit(data, 8 * MB, 4_000_000, fit)
    assert not out.reduced and out.scale == "1" and out.image.shape == (960, 1280, 3)
    np.testing.assert_array_equal(out.image, decode_image(data, 8 * MB, 4_000_000))


@pytest.mark.parametrize(("mode", "options"), [("RGB", {"progressive": True}), ("CMYK", {}), ("L", {}),
                                               ("RGB", {"subsampling": 0})])
def test_progressive_cmyk_and_grey_jpegs_reduce_too(big, mode, options):
    data = io.BytesIO()
    Image.fromarray(big[..., ::-1]).convert(mode).save(data, "JPEG", quality=92, **options)
    out = decode_image_to_fit(data.getvalue(), 8 * MB, 4_000_000, 320)
    full = decode_image(data.getvalue(), 8 * MB, 4_000_000)
    assert out.scale == "1/4" and out.image.shape == (240, 320, 3) and (out.height, out.width) == (960, 1280)
    shrunk = cv2.resize(full, (320, 240), interpolation=cv2.INTER_AREA)
    assert np.abs(out.image.astype(int) - shrunk.astype(int)).mean() < 4  # same colours as the full decode


def test_other_formats_are_decoded_whole(big):
    out = decode_image_to_fit(png(big), 8 * MB, 4_000_000, 320)
    assert not out.reduced
    np.testing.assert_array_equal(out.image, big)


def test_the_scale_follows_the_letterboxed_size_not_the_long_side_alone():
    # 2000 x 400: letterboxed to 320 x 64; 1/4 gives 500 x 100 (both sides >= 320 x 64), 1/8 would give 250 x 50.
    img = np.random.default_rng(0).integers(0, 255, (400, 2000, 3), dtype=np.uint8)
    out = decode_image_to_fit(jpeg(img, 90), 8 * MB, 4_000_000, 320)
    assert out.image.shape == (100, 500, 3) and (out.height, out.width) == (400, 2000)


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_orientation_is_applied_and_the_upright_size_reported(big, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = io.BytesIO()
    Image.fromarray(big[..., ::-1]).save(data, "JPEG", quality=92, exif=exif)
    out = decode_image_to_fit(data.getvalue(), 8 * MB, 4_000_000, 320)
    full = decode_image(data.getvalue(), 8 * MB, 4_000_000)
    assert (out.height, out.width) == full.shape[:2] == ((1280, 960) if orientation in (6, 8) else (960, 1280))
    assert out.image.shape == (full.shape[0] // 4, full.shape[1] // 4, 3)
    # Upright the same way as the full decode: the reduced image matches the full one shrunk.
    shrunk = cv2.resize(full, (out.image.shape[1], out.image.shape[0]), interpolation=cv2.INTER_AREA)
    assert np.abs(out.image.astype(int) - shrunk.astype(int)).mean() < 4


def test_the_pixel_cap_is_the_originals_and_truncation_is_still_an_error(big):
    data = jpeg(big, 92)
    with pytest.raises(TooManyPixels, match="1280x960"):
        decode_image_to_fit(data, 8 * MB, 1_000_000, 320)  # the reduced 320 x 240 would fit; the file does not
    with pytest.raises(CorruptImage):
        decode_image_to_fit(data[: len(data) // 2], 8 * MB, 4_000_000, 320)


# -- the pipeline, in-process --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detector(checkpoint):
    return Detector.from_checkpoint(checkpoint, device="cpu", test_cfg=TestConfig.serving(input_size=INPUT_SIZE))


def service_with(checkpoint, reduced: bool) -> DetectionService:
    settings = ServiceSettings(weights=checkpoint, input_size=INPUT_SIZE, max_batch_size=2, decode_threads=1,
                               warmup=False, reduced_decode=reduced)
    svc = DetectionService(settings)  # its own registry builds its own model from the checkpoint
    svc.load()
    return svc


def expected_reduced(detector: Detector, data: bytes, factor: int, height: int, width: int):
    """The detector on OpenCV's 1/factor decode, boxes scaled back by original / decoded."""
    small = opencv_reduced(data, factor)
    dets = detector([small])[0]
    sx, sy = width / small.shape[1], height / small.shape[0]
    return dets.boxes * np.array([sx, sy, sx, sy], np.float32), dets


def assert_boxes_match(got, want_boxes, want, atol: float = 0.1) -> None:
    assert len(got.scores) == len(want.scores) > 0
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_allclose(got.scores, want.scores, atol=2e-3)
    np.testing.assert_allclose(got.boxes, want_boxes, atol=atol)


@pytest.mark.parametrize("reduced", [True, False])
def test_the_service_answers_in_the_originals_pixels_either_way(checkpoint, detector, big, reduced):
    data = jpeg(big, 92)
    svc = service_with(checkpoint, reduced)
    try:
        out = asyncio.run(svc.detect_encoded(None, data, DetectQuery(), None))
        full = asyncio.run(svc.detect_encoded(None, data, DetectQuery(), None, full_size=True))
    finally:
        svc.shutdown()
    assert (out.height, out.width) == (full.height, full.width) == (960, 1280)
    assert full.image.shape == (960, 1280, 3)  # the render routes' decode: every pixel
    want_full = detector([decode_image(data, 8 * MB, 4_000_000)])[0]
    np.testing.assert_allclose(full.detections.boxes, want_full.boxes, atol=1e-3)
    if reduced:
        assert out.image.shape == (240, 320, 3)
        boxes, want = expected_reduced(detector, data, 4, 960, 1280)
        assert_boxes_match(out.detections, boxes, want)
        # In the original's pixels: boxes reach past the decoded 320 x 240.
        assert out.detections.boxes[:, 2].max() > 320 and out.detections.boxes.max() <= 1280
    else:
        assert out.image.shape == (960, 1280, 3)
        np.testing.assert_allclose(out.detections.boxes, want_full.boxes, atol=1e-3)


# -- the real server -----------------------------------------------------------------------------------


def test_the_server_decodes_a_large_jpeg_reduced_and_renders_it_whole(server, auth, detector, big):
    data = jpeg(big, 92)
    assert len(data) < MB  # the shared server's upload cap
    before = metric_samples(server.http)
    with httpx.Client(base_url=server.http, headers=auth, timeout=60) as c:
        r = c.post("/detect", content=data, headers={"Content-Type": "image/jpeg"})
        rendered = c.post("/detect/render", content=data, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["width"], body["height"]) == (1280, 960)
    boxes, want = expected_reduced(detector, data, 4, 960, 1280)
    got = body["detections"]
    assert [d["label"] for d in got] == want.labels.tolist()
    np.testing.assert_allclose([d["box"] for d in got], boxes, atol=0.1)
    assert rendered.status_code == 200
    assert cv2.imdecode(np.frombuffer(rendered.content, np.uint8), cv2.IMREAD_COLOR).shape == (960, 1280, 3)
    after = metric_samples(server.http)

    def grew(scale: str) -> float:
        name = "rtmdet_images_decoded_total"
        return metric_value(after, name, scale=scale) - metric_value(before, name, scale=scale)

    # Other tests share this server: at least ours, the detect reduced and the render whole.
    assert grew("1/4") >= 1 and grew("1") >= 1

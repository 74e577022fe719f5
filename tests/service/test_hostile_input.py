"""Property-based hostile input (hypothesis): random bytes, truncated and mutated real JPEG/PNG/WebP/BMP files,
huge declared dimensions, zero-sized images and absurd query parameters. The decoder either returns an image
or raises `ImageError`; the real server answers 200 or a 4xx with a message, never a 5xx, and keeps serving."""
from __future__ import annotations

import struct
import zlib

import cv2
import grpc
import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from svc_helpers import API_KEY

from service.client import GrpcDetectorClient
from service.imaging import ImageError, decode_image

MAX_BYTES, MAX_PIXELS = 1024 * 1024, 2_000_000  # the shared server's caps (tests/service/conftest.py)


def _photo() -> np.ndarray:
    from skimage import data

    return np.ascontiguousarray(cv2.resize(data.chelsea()[..., ::-1], (48, 32)))


PHOTO = _photo()
REAL_FILES = {ext: cv2.imencode(ext, PHOTO)[1].tobytes() for ext in (".jpg", ".png", ".webp", ".bmp")}
REAL_FILES[".png-gray16"] = cv2.imencode(".png", (PHOTO[..., 0].astype(np.uint16) * 257))[1].tobytes()


def png_with_header(width: int, height: int, bit_depth: int = 8, color_type: int = 2, pixels: bytes = b"") -> bytes:
    """A PNG whose IHDR declares any size (valid CRCs), with whatever pixel data (usually far too little)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(pixels)) + chunk(b"IEND", b"")


def jpeg_with_size(width: int, height: int) -> bytes:
    """The real JPEG with its SOF frame's declared size overwritten."""
    data = bytearray(REAL_FILES[".jpg"])
    i = 2
    while i < len(data) - 9:
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5:i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF marker")


def bmp_with_size(width: int, height: int) -> bytes:
    data = bytearray(REAL_FILES[".bmp"])
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


@st.composite
def mutated_file(draw) -> bytes:
    data = bytearray(REAL_FILES[draw(st.sampled_from(sorted(REAL_FILES)))])
    for _ in range(draw(st.integers(1, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


@st.composite
def truncated_file(draw) -> bytes:
    data = REAL_FILES[draw(st.sampled_from(sorted(REAL_FILES)))]
    return data[: draw(st.integers(0, len(data) - 1))]


dims = st.one_of(st.integers(0, 4), st.integers(0, 2**31 - 1), st.sampled_from([0, 1, 65535, 65536, 2**31 - 1]))
hostile_bytes = st.one_of(
    st.binary(max_size=2048),
    mutated_file(),
    truncated_file(),
    st.builds(png_with_header, dims, dims, st.sampled_from([1, 8, 16]), st.sampled_from([0, 2, 3, 4, 6])),
    st.builds(jpeg_with_size, st.integers(0, 65535), st.integers(0, 65535)),
    st.builds(bmp_with_size, st.integers(-2**31, 2**31 - 1), st.integers(-2**31, 2**31 - 1)),
    st.sampled_from([b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF\0\0\0\0WEBP", b"BM" + b"\0" * 30]),
)


@settings(max_examples=400, deadline=None)
@given(hostile_bytes)
def test_decode_returns_an_image_or_an_image_error(data):
    try:
        img = decode_image(data, MAX_BYTES, MAX_PIXELS)
    except ImageError as exc:
        assert str(exc)
        return
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert 0 < img.shape[0] * img.shape[1] <= MAX_PIXELS


@pytest.mark.parametrize("width,height", [(100_000, 100_000), (65535, 65535), (2**31 - 1, 1), (0, 10), (10, 0)])
def test_declared_giants_and_empty_images_are_refused_from_the_header(width, height):
    with pytest.raises(ImageError):
        decode_image(png_with_header(width, height), MAX_BYTES, MAX_PIXELS)


number_text = st.one_of(st.sampled_from(["nan", "-nan", "inf", "-inf", "1e309", "-0", "0x10", "", " ", "1,5", "½",
                                         "9" * 400, "1e-320", "0.5", "3"]),
                        st.floats().map(repr), st.integers(-2**70, 2**70).map(str), st.text(max_size=20))
query = st.fixed_dictionaries({}, optional={
    "score_threshold": number_text, "max_detections": number_text, "timeout_ms": number_text,
    "classes": st.lists(st.text(max_size=12), max_size=4), "unknown": st.text(max_size=8)})
content_types = st.sampled_from(["image/jpeg", "image/png", "application/octet-stream", "text/plain", "",
                                 "multipart/form-data", "multipart/form-data; boundary=xyz", "image/gif",
                                 "image/jpeg; charset=\x7f"])
valid_image = st.sampled_from([REAL_FILES[".jpg"], REAL_FILES[".png"]])


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.one_of(hostile_bytes, valid_image), params=query, ctype=content_types)
def test_http_detect_answers_hostile_requests_with_4xx_and_a_message(server, body, params, ctype):
    r = httpx.post(f"{server.http}/detect", content=body, params=params,
                   headers={"Content-Type": ctype, "Authorization": f"Bearer {API_KEY}"}, timeout=60)
    if r.status_code == 504:  # a valid but tiny timeout_ms may pass before inference: the deadline's own answer
        assert "deadline" in r.json()["detail"] and float(params["timeout_ms"]) < 1000
        return
    assert r.status_code < 500, (r.status_code, r.text)
    if r.status_code == 200:
        # The real photo, or mutated bytes that still decode (hypothesis found a JPEG header that is a valid 1x1
        # image): either way the answer describes the image the decoder makes of these bytes.
        img = decode_image(body, MAX_BYTES, MAX_PIXELS)
        assert (r.json()["width"], r.json()["height"]) == (img.shape[1], img.shape[0])
        return
    assert 400 <= r.status_code < 500
    if r.headers.get("content-type", "").startswith("application/json"):
        assert r.json()["detail"], r.text
    else:  # refused by the HTTP layer itself (an illegal header): uvicorn's own plain-text 400
        assert r.status_code == 400 and r.text == "Invalid HTTP request received."


@pytest.fixture(scope="module")
def grpc_client(server):
    with GrpcDetectorClient(server.grpc, api_key=API_KEY, timeout=60) as c:
        yield c


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(height=dims, width=dims, channels=st.integers(0, 2**32 - 1), data=st.binary(max_size=4096),
       encoded=st.one_of(st.none(), hostile_bytes), thr=st.one_of(st.none(), st.floats(width=32)),
       top=st.one_of(st.none(), st.integers(0, 2**32 - 1)))
def test_grpc_detect_answers_hostile_requests_with_client_errors(grpc_client, height, width, channels, data, encoded,
                                                                 thr, top):
    pb = grpc_client.pb
    req = pb.DetectRequest()
    if encoded is not None:
        req.encoded = encoded
    else:
        req.raw.CopyFrom(pb.RawImage(data=data, height=height, width=width, channels=channels))
    if thr is not None:
        req.score_threshold = thr
    if top is not None:
        req.max_detections = top
    try:
        grpc_client.stub.Detect(req, timeout=60, metadata=grpc_client.metadata)
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), exc
        assert exc.details()


def test_the_server_is_still_healthy_after_the_hostile_rounds(server):
    assert httpx.get(f"{server.http}/readyz", timeout=5).status_code == 200
    assert server.proc.poll() is None
